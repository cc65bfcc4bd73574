"""PagedKVStore: every layer's keys and values in fixed-size pages (the MLX side of the paged cache).

Per layer, one arena of ``num_pages * page_size`` token slots::

    k[layer]: (num_pages * page_size, n_kv_heads, head_dim)     slot = page * page_size + offset

Page 0 is the null page: the block pool never hands it out, so writes of padding tokens land there
and reads of it are always masked. Which pages belong to which request is the KV manager's business;
the store only moves rows in and out by slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


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
        shape = (num_pages * page_size, layout.n_kv_heads, layout.head_dim)
        self.k = [mx.zeros(shape, layout.dtype) for _ in range(layout.num_layers)]
        self.v = [mx.zeros(shape, layout.dtype) for _ in range(layout.num_layers)]
        mx.eval(self.k, self.v)

    def write(self, layer: int, k: mx.array, v: mx.array, slot_mapping: mx.array) -> None:
        """Store new rows. k, v: (T, n_kv_heads, head_dim); slot_mapping: (T,) int32."""
        self.k[layer][slot_mapping] = k.astype(self.layout.dtype)
        self.v[layer][slot_mapping] = v.astype(self.layout.dtype)

    def gather(self, layer: int, slots: mx.array) -> tuple[mx.array, mx.array]:
        """Rows at ``slots`` (B, S) -> keys, values (B, S, n_kv_heads, head_dim)."""
        return self.k[layer][slots], self.v[layer][slots]

    @property
    def arrays(self) -> list[mx.array]:
        return self.k + self.v

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)
