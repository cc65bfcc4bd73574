"""Scheduler: which tokens of which requests the next step computes (layer L1: no mlx).

"Tokens catch up": every request has ``num_tokens`` (prompt + sampled) and ``num_computed_tokens``
(KV in the cache). Each step computes ``num_tokens - num_computed_tokens`` of them, capped by the
step's token budget and ``max_prefill_chunk``; prefill, chunked prefill, decode and recompute after
preemption are the same rule. A step is

    schedule() -> SchedulerOutput -> ModelRunner.execute() -> RunnerOutput -> update_from_output()

Running requests are served first (oldest first), then waiting ones (FIFO; preempted requests go
back to the front). When pages run out, the newest running request is preempted: its pages are
freed and it is recomputed later from its tokens.

NOTE(engine): n > 1 is not forked here; the API side submits n requests with ids "<id>-<i>" and the
same prompt, and the prefix cache shares their full prompt blocks (a fork would also share the
partial last block, and lets them skip one prefill).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlxserve.engine.config import CacheConfig, SchedulerConfig
from mlxserve.engine.metrics import EngineMetrics, MetricsCollector
from mlxserve.engine.request import EngineOutput, EngineRequest, Request, RequestStatus
from mlxserve.errors import ContextLengthError, InvalidRequestError
from mlxserve.kv.block_pool import BlockPool
from mlxserve.kv.manager import KVBlocks, KVCacheManager
from mlxserve.sampling.params import SamplingParams

__all__ = ["NewRequestData", "RunnerOutput", "RunningRequestData", "Scheduler", "SchedulerOutput"]


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the runner has no state for: first admission, or resumed after preemption
    (then ``token_ids`` holds the outputs so far too, all recomputed)."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + outputs so far
    num_prompt_tokens: int
    sampling: SamplingParams
    adapter_id: str | None
    block_ids: tuple[int, ...]  # whole block table
    num_computed_tokens: int  # prefix-cache hit: KV of token_ids[:num_computed_tokens] is in the pages
    do_sample: bool  # this step reaches the last token: sample from its logits


@dataclass(frozen=True, slots=True)
class RunningRequestData:
    """A request the runner already holds; the diff since its previous step."""

    request_id: str
    new_token_ids: tuple[int, ...]  # the tokens to compute this step (1 when decoding)
    new_block_ids: tuple[int, ...]  # to append to the runner's block table
    num_computed_tokens: int  # position of new_token_ids[0]
    do_sample: bool


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled_new_reqs: tuple[NewRequestData, ...]
    scheduled_running: tuple[RunningRequestData, ...]
    num_scheduled_tokens: Mapping[str, int]  # request_id -> tokens computed this step
    total_num_scheduled_tokens: int
    finished_ids: frozenset[str]  # finished or aborted since the last step: drop their state first
    preempted_ids: tuple[str, ...]  # drop their state too; they come back as new requests

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """One row per sampled request. ``sampled_token_ids[i]`` holds the tokens of
    ``request_ids[i]`` (one per step today); ``logprobs[i]`` one opaque entry per token."""

    request_ids: Sequence[str]
    sampled_token_ids: Sequence[Sequence[int]]
    logprobs: Sequence[Sequence[Any]] | None = None


@dataclass(slots=True)
class _Step:
    token_budget: int
    new_reqs: list[NewRequestData] = field(default_factory=list)
    running: list[RunningRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted_ids: list[str] = field(default_factory=list)

    def take(self, request_id: str, num_tokens: int) -> None:
        self.num_scheduled_tokens[request_id] = num_tokens
        self.token_budget -= num_tokens


class Scheduler:
    """Owns the waiting queue, the running list and every request's KV (engine thread only)."""

    def __init__(
        self, config: SchedulerConfig, kv_manager: KVCacheManager, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        config.validate()
        self.config = config
        self.kv = kv_manager
        self._clock = clock
        self.requests: dict[str, Request] = {}  # unfinished only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is last
        self.metrics = MetricsCollector()
        self._finished_ids: set[str] = set()

    @classmethod
    def from_config(
        cls, config: SchedulerConfig, cache_config: CacheConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> Scheduler:
        cache_config.validate()
        kv = KVCacheManager(
            BlockPool(cache_config.num_pages),
            cache_config.page_size,
            enable_prefix_caching=cache_config.enable_prefix_caching,
            sliding_window=cache_config.sliding_window,
        )
        return cls(config, kv, clock=clock)

    # ---- requests in and out ---------------------------------------------------------------

    def add_request(self, engine_request: EngineRequest) -> None:
        """Queue a request, or refuse it at once if it could never complete."""
        self._check_fits(engine_request)
        if engine_request.request_id in self.requests:
            raise InvalidRequestError(f"request id {engine_request.request_id!r} is in use", param="request_id")
        request = Request(engine_request)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.metrics.record_arrival(request.request_id, engine_request.arrival_time)

    def _check_fits(self, req: EngineRequest) -> None:
        num_prompt, max_tokens = len(req.prompt_token_ids), req.sampling.max_tokens
        max_len = self.config.max_model_len
        if num_prompt + max_tokens > max_len:
            raise ContextLengthError(
                f"this model's maximum context length is {max_len} tokens, but {num_prompt + max_tokens} were "
                f"requested ({num_prompt} in the prompt, {max_tokens} for the completion)",
                param="prompt" if num_prompt >= max_len else "max_tokens",
            )
        # The last sampled token is never fed back, so it needs no KV slot.
        num_blocks = self.kv.num_blocks_needed(num_prompt + max_tokens - 1, self.config.max_prefill_chunk)
        if num_blocks > self.kv.num_total_blocks:
            raise ContextLengthError(
                f"the request needs {num_blocks} KV pages ({num_prompt} prompt + {max_tokens} completion tokens) "
                f"but the KV cache has {self.kv.num_total_blocks}; lower max_tokens or give the cache more memory",
                param="max_tokens",
            )

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request in any state and free its pages now. False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        was_running = req.status is RequestStatus.RUNNING
        if was_running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED_ABORTED
        self._finish(req, was_running=was_running)
        return True

    def _finish(self, req: Request, *, was_running: bool) -> None:
        """Release a request whose status is already FINISHED_*; the runner learns of it next step."""
        self.kv.free(req)
        del self.requests[req.request_id]
        if was_running:
            self._finished_ids.add(req.request_id)
        self.metrics.record_finish(req.request_id, req.status.finish_reason.value, self._clock())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def make_metrics(self) -> EngineMetrics:
        return self.metrics.snapshot(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_pages_used=self.kv.num_used_blocks,
            num_pages_total=self.kv.num_total_blocks,
        )

    # ---- schedule ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _Step(token_budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted_ids:  # pages are short: admitting newcomers would only thrash
            self._schedule_waiting(step)
        return self._make_output(step)

    def _num_new_tokens(self, req: Request, num_computed: int, token_budget: int) -> int:
        return min(req.num_tokens - num_computed, token_budget, self.config.max_prefill_chunk)

    def _schedule_running(self, step: _Step) -> None:
        index = 0
        while index < len(self.running) and step.token_budget > 0:
            req = self.running[index]
            num_new = self._num_new_tokens(req, req.num_computed_tokens, step.token_budget)
            assert num_new > 0, f"running request {req.request_id} has nothing to compute"
            new_blocks = self._allocate_or_preempt(req, num_new, step)
            if new_blocks is None:
                return  # req was the newest and preempted itself: nobody follows it
            start = req.num_computed_tokens
            step.running.append(
                RunningRequestData(
                    request_id=req.request_id,
                    new_token_ids=tuple(req.all_token_ids[start : start + num_new]),
                    new_block_ids=tuple(new_blocks.block_ids),
                    num_computed_tokens=start,
                    do_sample=start + num_new == req.num_tokens,
                )
            )
            step.take(req.request_id, num_new)
            index += 1

    def _allocate_or_preempt(self, req: Request, num_new: int, step: _Step) -> KVBlocks | None:
        """Allocate, preempting the newest running requests until it fits; None if ``req`` itself
        had to go (it is back at the front of the waiting queue)."""
        while True:
            new_blocks = self.kv.allocate_slots(req, num_new)
            if new_blocks is not None:
                return new_blocks
            victim = self.running.pop()
            self._preempt(victim)
            step.preempted_ids.append(victim.request_id)
            if victim is req:
                return None

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self.metrics.record_preemption()

    def _schedule_waiting(self, step: _Step) -> None:
        while self.waiting and step.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit, num_hit = self.kv.get_computed_blocks(req)
            num_new = self._num_new_tokens(req, num_hit, step.token_budget)
            if self.kv.allocate_slots(req, num_new, hit) is None:
                return  # FIFO: the head waits until running requests free pages
            self.waiting.popleft()
            if req.status is RequestStatus.WAITING:  # first admission, not a resume
                req.num_cached_tokens = num_hit
                self.metrics.record_admission(req.num_prompt_tokens, num_hit)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            self.running.append(req)
            step.new_reqs.append(
                NewRequestData(
                    request_id=req.request_id,
                    token_ids=tuple(req.all_token_ids),
                    num_prompt_tokens=req.num_prompt_tokens,
                    sampling=req.sampling,
                    adapter_id=req.adapter_id,
                    block_ids=tuple(self.kv.get_block_ids(req.request_id)),
                    num_computed_tokens=num_hit,
                    do_sample=num_hit + num_new == req.num_tokens,
                )
            )
            step.take(req.request_id, num_new)

    def _make_output(self, step: _Step) -> SchedulerOutput:
        finished_ids = frozenset(self._finished_ids)
        self._finished_ids.clear()
        return SchedulerOutput(
            scheduled_new_reqs=tuple(step.new_reqs),
            scheduled_running=tuple(step.running),
            num_scheduled_tokens=dict(step.num_scheduled_tokens),
            total_num_scheduled_tokens=sum(step.num_scheduled_tokens.values()),
            finished_ids=finished_ids,
            preempted_ids=tuple(step.preempted_ids),
        )

    # ---- update ------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[EngineOutput]:
        """Advance every scheduled request by what it computed; append sampled tokens; finish."""
        row_of = {request_id: row for row, request_id in enumerate(runner_output.request_ids)}
        now = self._clock()
        outputs = []
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            req = self.requests.get(request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted after schedule(): its pages are already free
            req.num_computed_tokens += num_scheduled
            self.kv.cache_blocks(req, req.num_computed_tokens)
            if req.num_computed_tokens < req.num_tokens:
                continue  # mid-prefill: a token sampled from a chunk's end is meaningless
            row = row_of.get(request_id)
            assert row is not None, f"runner sampled no token for {request_id}"
            logprobs = runner_output.logprobs[row] if runner_output.logprobs is not None else None
            outputs.append(self._append_tokens(req, runner_output.sampled_token_ids[row], logprobs, now))
        return outputs

    def _append_tokens(
        self, req: Request, sampled: Sequence[int], logprobs: Sequence[Any] | None, now: float
    ) -> EngineOutput:
        assert len(sampled) > 0, f"runner sampled no token for {req.request_id}"
        new_token_ids: list[int] = []
        finished_status = None
        for token_id in sampled:
            req.append_output_token_id(token_id)
            new_token_ids.append(token_id)
            finished_status = self._check_stop(req, token_id)
            if finished_status is not None:
                break
        self.metrics.record_tokens(req.request_id, len(new_token_ids), now)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        if finished_status is not None:
            req.status = finished_status
            self.running.remove(req)
            self._finish(req, was_running=True)
        return EngineOutput(
            request_id=req.request_id,
            new_token_ids=tuple(new_token_ids),
            finish_reason=req.status.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            new_logprobs=tuple(logprobs[: len(new_token_ids)]) if logprobs is not None else None,
            stop_token_id=req.stop_token_id,
        )

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        # As in vLLM: a stop token wins over the length limit when both hit on the same token.
        if token_id in req.engine_request.eos_token_ids or token_id in req.sampling.stop_token_ids:
            req.stop_token_id = token_id
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.sampling.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
