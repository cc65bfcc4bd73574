"""Logits processors: penalties and logit_bias, as lazy MLX ops (no host reads).

A processor is called as ``processor(token_ids, num_prompt_tokens, logits) -> logits`` where
``token_ids`` is the (n,) int32 array of prompt + generated tokens so far, ``num_prompt_tokens`` is how
many of them are the prompt, and ``logits`` is (1, V) or (B, V) (the same history for every row).
Processors never modify their input array; each returns a new lazy array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx

from mlxserve.sampling.params import SamplingParams

__all__ = [
    "LogitsProcessor",
    "RepetitionPenalty",
    "PresenceFrequencyPenalty",
    "LogitBias",
    "make_logits_processors",
    "apply_logits_processors",
]


class LogitsProcessor(Protocol):
    def __call__(self, token_ids: mx.array, num_prompt_tokens: int, logits: mx.array) -> mx.array: ...


def _row_indices(ids: mx.array, logits: mx.array) -> mx.array:
    """(n,) ids -> (B, n) indices for take/put_along_axis over logits (B, V)."""
    return mx.broadcast_to(ids[None, :], (logits.shape[0], ids.shape[0]))


@dataclass(frozen=True, slots=True)
class RepetitionPenalty:
    """CTRL / mlx-lm repetition penalty over the last ``context_size`` tokens (prompt included):
    positive logits are divided by ``penalty``, negative ones multiplied. Counts do not matter."""

    penalty: float
    context_size: int = 20

    def __call__(self, token_ids: mx.array, num_prompt_tokens: int, logits: mx.array) -> mx.array:
        context = token_ids[-self.context_size :]
        if context.shape[0] == 0:
            return logits
        idx = _row_indices(context, logits)
        selected = mx.take_along_axis(logits, idx, axis=-1)
        penalized = mx.where(selected < 0, selected * self.penalty, selected / self.penalty)
        # Repeated ids write the same value twice, so duplicates in the context are harmless.
        return mx.put_along_axis(logits, idx, penalized.astype(logits.dtype), axis=-1)


@dataclass(frozen=True, slots=True)
class PresenceFrequencyPenalty:
    """OpenAI penalties over generated tokens only:
    ``logits[t] -= presence * (count[t] > 0) + frequency * count[t]``."""

    presence: float = 0.0
    frequency: float = 0.0

    def __call__(self, token_ids: mx.array, num_prompt_tokens: int, logits: mx.array) -> mx.array:
        generated = token_ids[num_prompt_tokens:]
        if generated.shape[0] == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=mx.float32).at[generated].add(1.0)  # (V,)
        penalty = self.presence * (counts > 0).astype(mx.float32) + self.frequency * counts
        return (logits - penalty[None, :]).astype(logits.dtype)


@dataclass(frozen=True, slots=True)
class LogitBias:
    """Add ``biases[i]`` to the logit of ``token_ids[i]`` (OpenAI ``logit_bias``)."""

    token_ids: tuple[int, ...]
    biases: tuple[float, ...]
    _ids: mx.array = field(init=False, repr=False, compare=False)
    _values: mx.array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", mx.array(self.token_ids, dtype=mx.int32))
        object.__setattr__(self, "_values", mx.array(self.biases, dtype=mx.float32))

    def __call__(self, token_ids: mx.array, num_prompt_tokens: int, logits: mx.array) -> mx.array:
        return logits.at[:, self._ids].add(self._values.astype(logits.dtype))


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The processors ``params`` asks for, in application order: repetition penalty, presence and
    frequency penalties, then logit_bias last (so a -100 bias bans a token whatever the penalties)."""
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(params.repetition_penalty, params.repetition_context_size))
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        processors.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty))
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        processors.append(LogitBias(tuple(ids), tuple(biases)))
    return processors


def apply_logits_processors(
    processors: Sequence[LogitsProcessor], token_ids: mx.array, num_prompt_tokens: int, logits: mx.array
) -> mx.array:
    for processor in processors:
        logits = processor(token_ids, num_prompt_tokens, logits)
    return logits
