"""SamplingParams: how one request samples, validated once at the edge (layer L1: no mlx).

Invalid values raise :class:`~mlxserve.errors.InvalidRequestError` whose ``param`` names the field,
so the server can answer 400 with OpenAI's error shape. Limits (and why):

==========================  ===================  =================================================
field                       valid                note
==========================  ===================  =================================================
max_tokens                  1 .. 2**31
temperature                 0 .. 100             0 = greedy. OpenAI caps at 2; server/protocol.py
                                                 enforces that at the HTTP edge, the Python API
                                                 allows flatter distributions.
top_p                       (0, 1]               1 = off
top_k                       >= 0                 0 = off
min_p                       [0, 1]               0 = off
repetition_penalty          > 0 (and <= 100)     1 = off; mlx-lm/CTRL semantics
repetition_context_size     1 .. 2**20
presence/frequency_penalty  [-2, 2]              OpenAI semantics; 0 = off
logit_bias                  <= 1024 entries      ids >= 0 (< vocab: validate_for_vocab),
                                                 values in [-100, 100]
seed                        [0, 2**63)           None = global RNG
stop                        <= 16 strings        each 1..256 characters
stop_token_ids              ids >= 0             (< vocab: validate_for_vocab)
top_logprobs                0 .. 20              needs logprobs=True when > 0
==========================  ===================  =================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mlxserve.errors import InvalidRequestError

__all__ = ["SamplingParams"]

MAX_TOKENS_LIMIT = 2**31
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_REPETITION_CONTEXT = 2**20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOP_LOGPROBS = 20
SEED_LIMIT = 2**63


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Frozen, hashable sampling settings. ``logit_bias`` is stored as sorted (token_id, bias) pairs;
    ``stop``/``stop_token_ids`` as tuples (lists are accepted and converted)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, 0, None)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY, low_open=True)
        _check_int("repetition_context_size", self.repetition_context_size, 1, MAX_REPETITION_CONTEXT)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        if not isinstance(self.logprobs, bool):
            raise InvalidRequestError("`logprobs` must be a boolean", param="logprobs")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequestError("`logprobs` must be true when `top_logprobs` is used", param="top_logprobs")
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_token_ids(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logit_bias_map(self) -> dict[int, float]:
        """``logit_bias`` as a fresh dict (empty when unset)."""
        return dict(self.logit_bias or ())

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check token ids against the model's vocabulary (known only once a model is loaded)."""
        for token_id, _ in self.logit_bias or ():
            if token_id >= vocab_size:
                raise InvalidRequestError(
                    f"`logit_bias` token id {token_id} is out of the vocabulary (size {vocab_size})", param="logit_bias"
                )
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise InvalidRequestError(
                    f"`stop_token_ids` id {token_id} is out of the vocabulary (size {vocab_size})",
                    param="stop_token_ids",
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if not _is_int(value):
        raise InvalidRequestError(f"`{name}` must be an integer, got {type(value).__name__}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequestError(f"`{name}` must be {bounds}, got {value}", param=name)


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"`{name}` must be a finite number, got {value!r}", param=name)
    if value < low or (low_open and value == low) or value > high:
        bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequestError(f"`{name}` must be in {bounds}, got {value}", param=name)


def _normalize_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):  # OpenAI allows a single string
        stop = (stop,)
    if not isinstance(stop, Iterable):
        raise InvalidRequestError("`stop` must be a list of strings", param="stop")
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"`stop` allows at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidRequestError(f"each `stop` string must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    return stop


def _normalize_token_ids(ids: Any) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InvalidRequestError("`stop_token_ids` must be a list of token ids", param="stop_token_ids")
    ids = tuple(ids)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"`stop_token_ids` allows at most {MAX_STOP_TOKEN_IDS} ids", param="stop_token_ids")
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise InvalidRequestError("`stop_token_ids` must be non-negative integers", param="stop_token_ids")
    return ids


def _normalize_logit_bias(bias: Any) -> tuple[tuple[int, float], ...] | None:
    if bias is None:
        return None
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in bias):
        items = list(bias)
    else:
        raise InvalidRequestError("`logit_bias` must map token ids to biases", param="logit_bias")
    if len(items) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"`logit_bias` allows at most {MAX_LOGIT_BIAS_ENTRIES} entries", param="logit_bias")
    pairs = {}
    for token_id, value in items:
        if not _is_int(token_id) or token_id < 0:
            raise InvalidRequestError(f"`logit_bias` keys must be token ids >= 0, got {token_id!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise InvalidRequestError(f"`logit_bias` values must be in [-100, 100], got {value!r}", param="logit_bias")
        pairs[token_id] = float(value)
    return tuple(sorted(pairs.items())) or None
