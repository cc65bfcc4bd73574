"""The paged cache seen through the model's per-layer cache interface, for one batched forward.

Models call ``cache.offset`` (RoPE positions) and ``cache.update(k, v) -> AttentionInputs``. Here
each row of the batch is one request with its own start position and block table: new K/V rows are
scattered into their pages, then the row's context is gathered back and masked. This is the
reference path (gather + MLX's fused attention); a paged Metal kernel can replace it per layer.

The index arrays and masks are built once per forward, on the host with numpy (a handful of
small copies), and shared by every layer: built with MLX ops they would cost a dozen lazy ops per
layer, which on the CPU backend is a visible share of a small model's decode step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from mlxserve.kv.paged_store import PagedKVStore
from mlxserve.models.cache import AttentionInputs


class RowSpec(Protocol):
    start: int  # position of the row's first new token
    num_new: int  # new tokens this forward
    block_ids: Sequence[int]  # the request's block table


@dataclass(frozen=True)
class BatchLayout:
    """Where one forward's tokens live. B rows padded to L tokens; S = context slots gathered per row.

    S covers the longest context of the batch rounded up to whole pages, not the longest block
    table: pages allocated ahead of the context are neither gathered nor attended to.
    """

    offsets: mx.array  # (B,) int32 position of each row's first new token
    write_rows: mx.array  # (B * 2 * H_kv * L, 1) int32 arena rows of the new tokens (padding -> null page)
    page_rows: mx.array  # (B, 2 * H_kv, S / page_size) int32 pages of each row's context (past its table -> null page)
    masks: dict[int | None, mx.array]  # sliding window (None: none) -> (B, 1, L, S) bool, True = attend

    @classmethod
    def build(cls, rows: Sequence[RowSpec], store: PagedKVStore, windows: Iterable[int | None] = (None,)) -> BatchLayout:
        """``windows``: the distinct sliding windows of the model's layers (None: a full-attention layer)."""
        B, page_size = len(rows), store.page_size
        starts = np.fromiter((r.start for r in rows), np.int64, B)
        num_new = np.fromiter((r.num_new for r in rows), np.int64, B)
        ends = starts + num_new  # (B,) context length after this forward
        L, P = int(num_new.max()), -(-int(ends.max()) // page_size)
        tables = np.zeros((B, P), np.int64)  # pages past a row's table stay 0: the null page
        for b, r in enumerate(rows):
            ids = r.block_ids[:P]
            tables[b, : len(ids)] = ids
        q_pos = starts[:, None] + np.arange(L)  # (B, L) position of each query
        pages = tables[np.arange(B)[:, None], np.minimum(q_pos // page_size, P - 1)]
        slots = pages * page_size + q_pos % page_size
        if L > 1:
            slots[np.arange(L) >= num_new[:, None]] = 0  # padding writes to the null page
        return cls(
            offsets=mx.array(starts.astype(np.int32)),
            write_rows=mx.array(store.write_rows(slots).astype(np.int32)),
            page_rows=mx.array(store.page_rows(tables).astype(np.int32)),
            masks={w: mx.array(_mask(q_pos, ends, P * page_size, w)) for w in windows},
        )


def _mask(q_pos: np.ndarray, ends: np.ndarray, S: int, window: int | None) -> np.ndarray:
    """(B, 1, L, S) bool: causal, inside the row's context, and inside the sliding window."""
    k_pos = np.arange(S)[None, None, :]
    q = q_pos[:, :, None]
    keep = (k_pos <= q) & (k_pos < ends[:, None, None])
    if window is not None:
        keep &= k_pos > q - window
    return keep[:, None]


class PagedLayerCache:
    """One layer's view for one forward call."""

    def __init__(self, store: PagedKVStore, layer: int, layout: BatchLayout, window: int | None) -> None:
        self.store, self.layer, self.layout, self.window = store, layer, layout, window
        self.offset = layout.offsets
        self.read: mx.array | None = None  # this layer's gather: once evaluated, the arena may be written again

    def update(self, keys: mx.array, values: mx.array) -> AttentionInputs:
        """keys, values: (B, H_kv, L, D) of the new tokens -> the whole context of each row."""
        self.store.write(self.layer, keys, values, self.layout.write_rows)
        k, v = self.store.gather_pages(self.layer, self.layout.page_rows)  # (B, H_kv, S, D)
        self.read = k
        return AttentionInputs(k, v, self.layout.masks[self.window])
