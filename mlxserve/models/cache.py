"""Per-layer KV caches for single-stream generation.

Each cache owns one layer's keys and values and decides the attention mask for the queries it is
given, because only it knows which positions it still holds:

* ``KVCache``: every position, in one buffer grown in steps (contiguous).
* ``RotatingKVCache(window, keep)``: a ring buffer holding the first ``keep`` positions and the last
  ``window - keep``. It serves sliding-window layers (keep=0: each query sees the ``window`` most
  recent positions, itself included, as Hugging Face defines it) and ``max_kv_size`` memory caps
  (keep=4 "attention sink" tokens, as mlx-lm does).

``update(keys, values) -> AttentionInputs``: keys/values (B, H_kv, L, D) for positions
offset..offset+L-1, already rotated. The returned mask is None (attend to all), "causal", or a bool
array (L, S) with True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class AttentionInputs:
    keys: mx.array  # (B, H_kv, S, D)
    values: mx.array  # (B, H_kv, S, D)
    mask: mx.array | str | None


class KVCache:
    """Contiguous cache of every position. Grows in ``step``-token increments to avoid reallocs."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> AttentionInputs:
        B, H, L, D = keys.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        mask = None if L == 1 else "causal"  # MLX aligns "causal" to the last query row
        return AttentionInputs(self.keys[..., :end, :], self.values[..., :end, :], mask)

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, D = keys.shape
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, capacity, D), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[-1]), values.dtype)
        if self.keys is not None and self.offset > 0:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate to materialise the cache."""
        return [] if self.keys is None else [self.keys, self.values]

    def trim(self, num_tokens: int) -> int:
        """Forget the last ``num_tokens`` positions (e.g. to re-run a changed chat turn)."""
        num_tokens = min(num_tokens, self.offset)
        self.offset -= num_tokens
        return num_tokens

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class RotatingKVCache:
    """Ring buffer of ``keep`` pinned positions plus the most recent ``window - keep`` ones.

    Layout of the buffer (capacity ``window``) once full::

        [ keep pinned | ring of window-keep slots, oldest at self._idx ... ]
    """

    def __init__(self, window: int, keep: int = 0) -> None:
        if not 0 <= keep < window:
            raise ValueError(f"keep ({keep}) must be smaller than the window ({window})")
        self.window = window
        self.keep = keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen so far
        self._filled = 0  # slots in use
        self._idx = keep  # next ring slot to overwrite, once full

    def update(self, keys: mx.array, values: mx.array) -> AttentionInputs:
        if keys.shape[2] == 1:
            return self._update_one(keys, values)
        return self._update_many(keys, values)

    def _update_one(self, keys: mx.array, values: mx.array) -> AttentionInputs:
        if self.keys is None:
            self._allocate(keys, values)
        if self._filled < self.window:
            slot = self._filled
            self._filled += 1
        else:
            slot = self._idx
            self._idx = self.keep + (self._idx - self.keep + 1) % (self.window - self.keep)
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        # Every held position is inside the window of the newest query: no mask.
        return AttentionInputs(self.keys[..., : self._filled, :], self.values[..., : self._filled, :], None)

    def _update_many(self, keys: mx.array, values: mx.array) -> AttentionInputs:
        L = keys.shape[2]
        old_k, old_v, old_pos = self._ordered()
        all_k = keys if old_k is None else mx.concatenate([old_k, keys], axis=2)
        all_v = values if old_v is None else mx.concatenate([old_v, values], axis=2)
        q_pos = mx.arange(self.offset, self.offset + L)
        k_pos = mx.concatenate([old_pos, q_pos]) if old_pos is not None else q_pos
        mask = self._mask(q_pos, k_pos)
        self.offset += L
        self._store(all_k, all_v)
        return AttentionInputs(all_k, all_v, mask)

    def _mask(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        """(L, S) bool: causal, within the window, or one of the pinned first ``keep`` positions."""
        q, k = q_pos[:, None], k_pos[None, :]
        in_window = (k > q - (self.window - self.keep)) | (k < self.keep)
        return (k <= q) & in_window

    def _ordered(self) -> tuple[mx.array | None, mx.array | None, mx.array | None]:
        """Held keys, values and positions in temporal order."""
        if self.keys is None or self._filled == 0:
            return None, None, None
        n = self._filled
        if self.offset <= self.window:  # never wrapped: slots are positions
            return self.keys[..., :n, :], self.values[..., :n, :], mx.arange(n)
        order = list(range(self.keep)) + list(range(self._idx, self.window)) + list(range(self.keep, self._idx))
        idx = mx.array(order)
        recent = self.window - self.keep
        pos = mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - recent, self.offset)])
        return self.keys[..., idx, :], self.values[..., idx, :], pos

    def _store(self, all_k: mx.array, all_v: mx.array) -> None:
        """Keep the pinned head and the most recent tail of a temporally ordered sequence."""
        n = all_k.shape[2]
        if n > self.window:
            tail = self.window - self.keep
            all_k = mx.concatenate([all_k[..., : self.keep, :], all_k[..., n - tail :, :]], axis=2)
            all_v = mx.concatenate([all_v[..., : self.keep, :], all_v[..., n - tail :, :]], axis=2)
            n = self.window
        self._allocate(all_k, all_v)
        self.keys[..., :n, :] = all_k
        self.values[..., :n, :] = all_v
        self._filled = n
        self._idx = self.keep

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        B, H, _, D = keys.shape
        self.keys = mx.zeros((B, H, self.window, D), keys.dtype)
        self.values = mx.zeros((B, H, self.window, values.shape[-1]), values.dtype)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def trim(self, num_tokens: int) -> int:
        """Forget the last positions, possible only while nothing has been overwritten."""
        if self.offset > self.window:
            return 0  # the ring has wrapped: the positions before them are gone
        num_tokens = min(num_tokens, self.offset)
        self.offset -= num_tokens
        self._filled -= num_tokens
        return num_tokens

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def make_layer_cache(window: int | None, max_kv_size: int | None) -> KVCache | RotatingKVCache:
    """The cache one layer needs: its own sliding window, a memory cap, or everything."""
    if window is not None and (max_kv_size is None or window <= max_kv_size):
        return RotatingKVCache(window, keep=0)
    if max_kv_size is not None:
        return RotatingKVCache(max_kv_size, keep=min(4, max_kv_size - 1))
    return KVCache()
