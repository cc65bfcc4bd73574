"""ModelRunner.execute(SchedulerOutput) -> RunnerOutput: one engine step on the model.

Rows that prefill run one forward each (their lengths differ widely); all decoding rows run
together as one (R, 1) batch. Each row then samples with its own parameters and seed (keyed by
output index, so a request samples the same tokens alone, batched, or recomputed). The step ends
with its single host read of the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlxserve.engine.batch_cache import BatchLayout, PagedLayerCache
from mlxserve.engine.scheduler import RunnerOutput, SchedulerOutput
from mlxserve.kv.paged_store import PagedKVStore
from mlxserve.sampling.processors import make_logits_processors
from mlxserve.sampling.sampler import Sampler


@dataclass
class _RequestState:
    """What the runner keeps per request between steps."""

    token_ids: list[int]  # prompt + outputs known to the runner
    num_prompt_tokens: int
    block_ids: list[int]
    sampler: Sampler
    processors: list = field(default_factory=list)


@dataclass(frozen=True)
class _Row:
    request_id: str
    start: int  # position of the first token computed this step
    tokens: tuple[int, ...]
    block_ids: list[int]
    do_sample: bool

    @property
    def num_new(self) -> int:
        return len(self.tokens)


class ModelRunner:
    def __init__(self, model: nn.Module, store: PagedKVStore, windows: list[int | None]) -> None:
        self.model = model
        self.store = store
        self.windows = windows  # per layer: sliding window or None
        self.states: dict[str, _RequestState] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in (*out.finished_ids, *out.preempted_ids):
            self.states.pop(request_id, None)
        rows = self._rows(out)
        if not rows:
            return RunnerOutput(request_ids=(), sampled_token_ids=())
        logits_by_id: dict[str, mx.array] = {}
        decode = [r for r in rows if r.num_new == 1]
        for row in (r for r in rows if r.num_new > 1):
            logits_by_id.update(self._forward([row]))
        if decode:
            logits_by_id.update(self._forward(decode))
        return self._sample(logits_by_id)

    def _rows(self, out: SchedulerOutput) -> list[_Row]:
        rows = []
        for new in out.scheduled_new_reqs:
            state = _RequestState(
                token_ids=list(new.token_ids), num_prompt_tokens=new.num_prompt_tokens,
                block_ids=list(new.block_ids), sampler=Sampler(new.sampling),
                processors=make_logits_processors(new.sampling),
            )
            self.states[new.request_id] = state
            n = out.num_scheduled_tokens[new.request_id]
            start = new.num_computed_tokens
            rows.append(_Row(new.request_id, start, tuple(new.token_ids[start : start + n]), state.block_ids, new.do_sample))
        for running in out.scheduled_running:
            state = self.states[running.request_id]
            state.block_ids.extend(running.new_block_ids)
            start = running.num_computed_tokens
            known = len(state.token_ids)
            state.token_ids.extend(running.new_token_ids[max(0, known - start) :])
            rows.append(_Row(running.request_id, start, tuple(running.new_token_ids), state.block_ids, running.do_sample))
        return rows

    def _forward(self, rows: list[_Row]) -> dict[str, mx.array]:
        """Run rows through the model; returns each sampling row's last logits (1, V)."""
        layout = BatchLayout.build(rows, self.store.page_size)
        L = max(r.num_new for r in rows)
        inputs = mx.array([list(r.tokens) + [0] * (L - r.num_new) for r in rows], dtype=mx.int32)
        cache = [PagedLayerCache(self.store, i, layout, w) for i, w in enumerate(self.windows)]
        logits = self.model(inputs, cache)  # (B, L, V)
        return {r.request_id: logits[b : b + 1, r.num_new - 1] for b, r in enumerate(rows) if r.do_sample}

    def _sample(self, logits_by_id: dict[str, mx.array]) -> RunnerOutput:
        request_ids, tokens, logprobs = [], [], []
        for request_id, logits in logits_by_id.items():
            state = self.states[request_id]
            if state.processors:
                context = mx.array(state.token_ids, dtype=mx.int32)
                for processor in state.processors:
                    logits = processor(context, state.num_prompt_tokens, logits)
            index = len(state.token_ids) - state.num_prompt_tokens  # output index: same alone or batched
            result = state.sampler(logits, index=index)
            request_ids.append(request_id)
            tokens.append(result.token_ids)
            logprobs.append(mx.take_along_axis(result.logprobs, result.token_ids[:, None], axis=-1)[:, 0])
        if not tokens:
            return RunnerOutput(request_ids=(), sampled_token_ids=())
        token_ids, token_logprobs = mx.concatenate(tokens), mx.concatenate(logprobs)
        mx.eval(token_ids, token_logprobs, self.store.arrays)
        sampled = token_ids.tolist()  # SYNC: the one host read of this step
        values = token_logprobs.tolist()
        for request_id, token in zip(request_ids, sampled):
            self.states[request_id].token_ids.append(token)
        return RunnerOutput(
            request_ids=tuple(request_ids), sampled_token_ids=[[t] for t in sampled], logprobs=[[v] for v in values]
        )

