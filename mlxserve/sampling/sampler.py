"""Sampler: logits -> token ids (+ logprobs), as lazy MLX ops with no host reads.

Order (as in HF/vLLM): temperature, then top_k, top_p, min_p masks, then a categorical draw.
``temperature == 0`` is greedy argmax. Nothing here calls ``.item()``/``.tolist()``, so the engine can
queue the next step (``mx.async_eval``) before it reads this one's tokens.

Logprobs convention: ``SampleResult.logprobs`` is ``log_softmax`` of the logits the sampler receives,
i.e. after the logits processors (penalties, logit_bias) and before temperature and truncation. It is
finite for every token, including in greedy mode, and does not change with temperature or top_p, so
``logprobs[token]`` reads as "how likely the model (with the request's biases) found this token".
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxserve.sampling.params import SamplingParams

__all__ = ["SampleResult", "Sampler", "apply_top_k", "apply_top_p", "apply_min_p"]

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_ids: mx.array  # (B,) int32
    logprobs: mx.array  # (B, V) float32, log_softmax of the processed logits (see module doc)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep exactly the ``k`` largest logits per row (ties broken arbitrarily); the rest -> -inf.
    logits: (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    drop_idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, k:]  # (B, V - k)
    return mx.put_along_axis(logits, drop_idx, mx.array(_NEG_INF, dtype=logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= ``p``
    (the top token always stays); the rest -> -inf. logits: (B, V)."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # (B, V), most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits.astype(mx.float32), axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # probability of the strictly better tokens
    kept = mx.where(mass_before < p, sorted_logits, mx.array(_NEG_INF, dtype=logits.dtype))
    return mx.put_along_axis(logits, order, kept, axis=-1)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below ``min_p`` times the top token's. In log space:
    keep ``logit >= max_logit + log(min_p)``. logits: (B, V)."""
    if min_p <= 0.0:
        return logits
    threshold = mx.max(logits, axis=-1, keepdims=True) + mx.log(mx.array(min_p, dtype=mx.float32))
    return mx.where(logits >= threshold, logits, mx.array(_NEG_INF, dtype=logits.dtype))


def seeded_key(seed: int, index: int) -> mx.array:
    """The PRNG key for output token ``index`` of a request seeded with ``seed``.

    A pure function of (seed, index), mixed with splitmix64 so that nearby seeds give unrelated
    streams: the same seed yields the same tokens alone, batched, or recomputed after preemption.
    """
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return mx.random.key((x ^ (x >> 31)) & _MASK63)


_MASK64, _MASK63 = 2**64 - 1, 2**63 - 1


class Sampler:
    """Samples one token per row with one request's ``SamplingParams``.

    With ``params.seed`` set, the draw for output token i uses ``seeded_key(seed, i)``, so a seed
    gives the same tokens whatever the global RNG did before; without a seed it draws from MLX's
    global RNG. ``index`` defaults to a counter of calls.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._calls = 0

    def __call__(self, logits: mx.array, index: int | None = None) -> SampleResult:
        """logits: (B, V) -> SampleResult with token_ids (B,) int32 and logprobs (B, V)."""
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.params.is_greedy:
            return SampleResult(mx.argmax(logits, axis=-1).astype(mx.int32), logprobs)
        index = self._calls if index is None else index
        self._calls = index + 1
        key = None if self.params.seed is None else seeded_key(self.params.seed, index)
        scaled = self._truncate(logits / self.params.temperature)
        return SampleResult(mx.random.categorical(scaled, axis=-1, key=key).astype(mx.int32), logprobs)

    def _truncate(self, logits: mx.array) -> mx.array:
        params = self.params
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        return apply_min_p(logits, params.min_p)
