"""Engine numbers for the server and benchmarks (layer L1: no mlx).

The scheduler owns one :class:`MetricsCollector` on the engine thread; ``snapshot()`` returns a
frozen :class:`EngineMetrics` that may cross to the API thread. Times are seconds on the engine's
clock (``time.monotonic`` unless a test injects another).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["EngineMetrics", "MetricsCollector", "RequestTiming"]


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """Latency record of one finished request."""

    request_id: str
    arrival_time: float
    first_token_time: float | None  # None when it finished (aborted) before any token
    finish_time: float
    num_output_tokens: int
    inter_token_times: tuple[float, ...]  # gaps between consecutive steps that produced tokens
    finish_reason: str

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """A point-in-time view of the engine."""

    num_waiting: int  # queue depth (preempted requests included)
    num_running: int
    num_pages_used: int
    num_pages_total: int
    prefix_cache_queried_tokens: int  # prompt tokens of admitted requests
    prefix_cache_hit_tokens: int  # of those, served from cached pages
    num_preemptions: int
    num_finished: int  # all finish reasons, aborts included
    recent_timings: tuple[RequestTiming, ...]  # the last finished requests, oldest first

    @property
    def kv_usage(self) -> float:
        return self.num_pages_used / self.num_pages_total if self.num_pages_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queried_tokens:
            return 0.0
        return self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens


@dataclass(slots=True)
class _LiveTiming:
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    inter_token_times: list[float] = field(default_factory=list)


class MetricsCollector:
    """Counters and per-request timings; engine thread only."""

    def __init__(self, max_recent_timings: int = 256) -> None:
        self.num_preemptions = 0
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.num_finished = 0
        self._live: dict[str, _LiveTiming] = {}
        self._recent: deque[RequestTiming] = deque(maxlen=max_recent_timings)

    def record_arrival(self, request_id: str, arrival_time: float) -> None:
        self._live[request_id] = _LiveTiming(arrival_time)

    def record_admission(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        """First admission of a request (not a resume after preemption)."""
        self.prefix_cache_queried_tokens += num_prompt_tokens
        self.prefix_cache_hit_tokens += num_hit_tokens

    def record_preemption(self) -> None:
        self.num_preemptions += 1

    def record_tokens(self, request_id: str, num_tokens: int, now: float) -> None:
        """A step gave ``request_id`` ``num_tokens`` new tokens at time ``now``."""
        live = self._live[request_id]
        if live.first_token_time is None:
            live.first_token_time = now
        else:
            live.inter_token_times.append(now - live.last_token_time)
        live.last_token_time = now
        live.num_output_tokens += num_tokens

    def record_finish(self, request_id: str, finish_reason: str, now: float) -> RequestTiming:
        live = self._live.pop(request_id)
        timing = RequestTiming(
            request_id=request_id,
            arrival_time=live.arrival_time,
            first_token_time=live.first_token_time,
            finish_time=now,
            num_output_tokens=live.num_output_tokens,
            inter_token_times=tuple(live.inter_token_times),
            finish_reason=finish_reason,
        )
        self._recent.append(timing)
        self.num_finished += 1
        return timing

    def snapshot(
        self, *, num_waiting: int, num_running: int, num_pages_used: int, num_pages_total: int
    ) -> EngineMetrics:
        return EngineMetrics(
            num_waiting=num_waiting,
            num_running=num_running,
            num_pages_used=num_pages_used,
            num_pages_total=num_pages_total,
            prefix_cache_queried_tokens=self.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=self.prefix_cache_hit_tokens,
            num_preemptions=self.num_preemptions,
            num_finished=self.num_finished,
            recent_timings=tuple(self._recent),
        )
