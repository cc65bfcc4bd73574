"""A KV cache that remembers which tokens it holds, so the next prompt reuses the common prefix.

Used by ``mlxserve chat`` (each turn re-renders the whole conversation; only the new part is
computed) and by any caller of ``stream_generate`` that passes one in.
"""

from __future__ import annotations

import mlx.nn as nn


class PromptCache:
    def __init__(self, model: nn.Module, *, max_kv_size: int | None = None) -> None:
        self.model = model
        self.max_kv_size = max_kv_size
        self.cache = model.make_cache(max_kv_size=max_kv_size)
        self.token_ids: list[int] = []  # tokens whose K/V the cache holds, in order

    def prepare(self, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
        """Reuse the longest cached prefix of ``prompt_ids``: returns (history, new tokens).

        At least one token is always left to compute, because its logits seed the first sample.
        When the cache cannot drop the tokens after the shared prefix (a rotating cache that has
        wrapped), it starts over.
        """
        common = _common_prefix_len(self.token_ids, prompt_ids)
        common = min(common, len(prompt_ids) - 1)
        to_drop = len(self.token_ids) - common
        if to_drop and not self._trim(to_drop):
            self.reset()
            common = 0
        self.token_ids = list(prompt_ids)
        return list(prompt_ids[:common]), list(prompt_ids[common:])

    def record(self, token_id: int) -> None:
        """A sampled token was fed back to the model: its K/V are now in the cache."""
        self.token_ids.append(token_id)

    def reset(self) -> None:
        self.cache = self.model.make_cache(max_kv_size=self.max_kv_size)
        self.token_ids = []

    def _trim(self, num_tokens: int) -> bool:
        # A partial failure leaves layers out of step; the caller then resets every layer.
        return all(c.trim(num_tokens) == num_tokens for c in self.cache)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
