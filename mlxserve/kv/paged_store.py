"""PagedKVStore: every layer's keys and values in fixed-size pages (the MLX side of the paged cache).

Per layer, one arena holds the keys then the values, head-major, as rows of ``head_dim``::

    kv[layer]: (2 * n_kv_heads * num_slots, head_dim)        num_slots = num_pages * page_size
    row of (c, h, slot) = (c * n_kv_heads + h) * num_slots + slot     c = 0 keys, 1 values
    slot = page * page_size + offset

Seen as (2 * n_kv_heads * num_pages, page_size * head_dim), one head's page is one contiguous row,
so a forward reads each row's context with one gather of whole pages, already in the
(n_kv_heads, S, head_dim) order attention wants: the attention matmuls read it without a copy
(a slot-major arena costs a transposing copy per layer, about 3x the attention time of a
Qwen2.5-0.5B decode step on CPU), and keys and values take one gather and one scatter, not two.

Page 0 is the null page: the block pool never hands it out, so writes of padding tokens land there
and reads of it are always masked. Which pages belong to which request is the KV manager's business;
the store only moves rows in and out.

Writes are in place only if an arena version has no other user when its scatter is dispatched (MLX
then reuses the buffer instead of copying the whole arena): the runner lets each forward finish
before it dispatches the next, and holds no arena version itself when it does.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: mx.Dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.n_kv_heads * self.head_dim * self.dtype.size


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_pages: int, page_size: int) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_slots = num_pages * page_size
        shape = (2 * layout.n_kv_heads * self.num_slots, layout.head_dim)
        self.kv = [mx.zeros(shape, layout.dtype) for _ in range(layout.num_layers)]
        mx.eval(self.kv)

    def write_rows(self, slot_mapping: np.ndarray) -> np.ndarray:
        """Arena rows of new tokens: slot_mapping (B, L) -> (B * 2 * n_kv_heads * L, 1), in the order
        ``write`` lays out their keys and values: (B, 2 * n_kv_heads, L), keys' heads first."""
        base = np.arange(2 * self.layout.n_kv_heads, dtype=np.int64) * self.num_slots
        return (base[None, :, None] + slot_mapping[:, None, :]).reshape(-1, 1)

    def page_rows(self, block_tables: np.ndarray) -> np.ndarray:
        """Rows of the page view for each table entry: block_tables (B, P) -> (B, 2 * n_kv_heads, P)."""
        base = np.arange(2 * self.layout.n_kv_heads, dtype=np.int64) * self.num_pages
        return base[None, :, None] + block_tables[:, None, :]

    def write(self, layer: int, keys: mx.array, values: mx.array, rows: mx.array) -> None:
        """Store new tokens. keys, values: (B, n_kv_heads, L, head_dim); rows: their ``write_rows``, int32."""
        new = mx.concatenate([keys, values], axis=1).reshape(-1, self.layout.head_dim)  # (B * 2H * L, D)
        if new.dtype != self.layout.dtype:
            new = new.astype(self.layout.dtype)
        # A new array per write (not ``arena[rows] = new``, which rebinds the same Python object), so
        # a caller holding this version still sees it after the next forward is built.
        self.kv[layer] = mx.put_along_axis(self.kv[layer], rows, new, axis=0)

    def gather_pages(self, layer: int, page_rows: mx.array) -> tuple[mx.array, mx.array]:
        """Whole pages: page_rows (B, 2 * n_kv_heads, P) int32 from ``page_rows`` -> keys, values
        (B, n_kv_heads, P * page_size, head_dim), each head's (S, head_dim) matrix contiguous."""
        B, H2, P = page_rows.shape
        D = self.layout.head_dim
        pages = self.kv[layer].reshape(H2 * self.num_pages, self.page_size * D)[page_rows]  # (B, 2H, P, page_size * D)
        kv = pages.reshape(B, H2, P * self.page_size, D)
        return kv[:, : H2 // 2], kv[:, H2 // 2 :]

    @property
    def arrays(self) -> list[mx.array]:
        return self.kv

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)
