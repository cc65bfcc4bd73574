"""Requests as the engine sees them (layer L1: no mlx).

``EngineRequest`` is the frozen message the API side puts in the engine's inbox; ``Request`` is the
engine thread's mutable record of it; ``EngineOutput`` is what goes back, once per step per request
that produced a token or finished.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from mlxserve.errors import InvalidRequestError
from mlxserve.kv.hashing import BlockHash
from mlxserve.sampling.params import SamplingParams

__all__ = ["EngineOutput", "EngineRequest", "FinishReason", "Request", "RequestStatus"]


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (API side) a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # cancelled: client gone, timeout, stop string found by the detokenizer


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # back in the waiting queue; recomputed from scratch when resumed
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A tokenized request, validated at the edge. ``eos_token_ids`` come from the tokenizer; pass
    an empty set to ignore EOS. ``arrival_time`` is on the engine's clock (``time.monotonic``)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    adapter_id: str | None = None
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        object.__setattr__(self, "eos_token_ids", frozenset(self.eos_token_ids))
        if not self.prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """New tokens of one request from one step. ``stop_token_id`` is the EOS/stop token that
    finished it (the last of ``new_token_ids``): the detokenizer leaves it out of the text."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    new_logprobs: tuple[Any, ...] | None = None  # one runner entry per new token, when asked for
    stop_token_id: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _TokenView(Sequence[int]):
    """Read-only window on a list the Request keeps appending to (no copy)."""

    __slots__ = ("_items",)

    def __init__(self, items: list[int]) -> None:
        self._items = items

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return f"_TokenView({self._items!r})"


@dataclass(slots=True, eq=False)
class Request:
    """The engine thread's mutable state of one request. Token ids change only via
    ``append_output_token_id``; everyone else reads the views."""

    engine_request: EngineRequest
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens hit in the prefix cache at first admission
    num_preemptions: int = 0
    stop_token_id: int | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)  # KVCacheManager's cache
    first_token_time: float | None = None
    last_token_time: float | None = None
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.engine_request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.engine_request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.engine_request.sampling

    @property
    def adapter_id(self) -> str | None:
        return self.engine_request.adapter_id

    @property
    def cache_salt(self) -> str | None:
        return self.engine_request.cache_salt

    @property
    def arrival_time(self) -> float:
        return self.engine_request.arrival_time

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.engine_request.prompt_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.engine_request.prompt_token_ids)

    @property
    def all_token_ids(self) -> Sequence[int]:
        return _TokenView(self._all_token_ids)

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        return tuple(self._all_token_ids[self.num_prompt_tokens :])

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_id(self, token_id: int) -> None:
        self._all_token_ids.append(token_id)
