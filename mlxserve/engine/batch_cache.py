"""The paged cache seen through the model's per-layer cache interface, for one batched forward.

Models call ``cache.offset`` (RoPE positions) and ``cache.update(k, v) -> AttentionInputs``. Here
each row of the batch is one request with its own start position and block table: new K/V rows are
scattered into their pages, then the row's whole context is gathered back and masked. This is the
reference path (gather + MLX's fused attention); a paged Metal kernel can replace it per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxserve.kv.paged_store import PagedKVStore
from mlxserve.models.cache import AttentionInputs


@dataclass(frozen=True)
class BatchLayout:
    """Where one forward's tokens live. B rows padded to L tokens; S = gathered context slots."""

    offsets: mx.array  # (B,) position of each row's first new token
    slot_mapping: mx.array  # (B * L,) int32 slot of every new token (padding -> null page)
    context_slots: mx.array  # (B, S) int32 slot of every context position (padding -> null page)
    q_pos: mx.array  # (B, L) position of each query
    context_lens: mx.array  # (B,) tokens of context per row after this step

    @classmethod
    def build(cls, rows: list, page_size: int) -> "BatchLayout":
        """rows: objects with .start (int), .num_new (int), .block_ids (list[int])."""
        L = max(r.num_new for r in rows)
        P = max(len(r.block_ids) for r in rows)
        slots = []
        for r in rows:
            slots += [_slot(r.block_ids, r.start + i, page_size) for i in range(r.num_new)]
            slots += [0] * (L - r.num_new)  # padding writes to the null page
        tables = mx.array([list(r.block_ids) + [0] * (P - len(r.block_ids)) for r in rows], dtype=mx.int32)
        context_slots = (tables[:, :, None] * page_size + mx.arange(page_size, dtype=mx.int32)).reshape(len(rows), -1)
        offsets = mx.array([r.start for r in rows], dtype=mx.int32)
        return cls(
            offsets=offsets,
            slot_mapping=mx.array(slots, dtype=mx.int32),
            context_slots=context_slots,
            q_pos=offsets[:, None] + mx.arange(L, dtype=mx.int32)[None, :],
            context_lens=mx.array([r.start + r.num_new for r in rows], dtype=mx.int32),
        )

    def mask(self, window: int | None) -> mx.array:
        """(B, 1, L, S) bool: causal, inside the row's context, and inside the sliding window."""
        k_pos = mx.arange(self.context_slots.shape[1], dtype=mx.int32)[None, None, :]
        q = self.q_pos[:, :, None]
        keep = (k_pos <= q) & (k_pos < self.context_lens[:, None, None])
        if window is not None:
            keep = keep & (k_pos > q - window)
        return keep[:, None]


def _slot(block_ids: list[int], pos: int, page_size: int) -> int:
    return block_ids[pos // page_size] * page_size + pos % page_size


class PagedLayerCache:
    """One layer's view for one forward call."""

    def __init__(self, store: PagedKVStore, layer: int, layout: BatchLayout, window: int | None) -> None:
        self.store, self.layer, self.layout, self.window = store, layer, layout, window
        self.offset = layout.offsets

    def update(self, keys: mx.array, values: mx.array) -> AttentionInputs:
        """keys, values: (B, H_kv, L, D) of the new tokens -> the whole context of each row."""
        B, H, L, D = keys.shape
        flat_k = keys.transpose(0, 2, 1, 3).reshape(B * L, H, D)
        flat_v = values.transpose(0, 2, 1, 3).reshape(B * L, H, values.shape[-1])
        self.store.write(self.layer, flat_k, flat_v, self.layout.slot_mapping)
        k, v = self.store.gather(self.layer, self.layout.context_slots)  # (B, S, H_kv, D)
        mask = self.layout.mask(self.window)
        return AttentionInputs(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
