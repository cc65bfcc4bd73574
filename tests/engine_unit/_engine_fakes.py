"""Fakes for the engine unit tests: request builders and a model runner that keeps a page store.

``PageRunner`` plays the ModelRunner's part with plain dicts: it keeps per-request token lists and
block tables from the SchedulerOutput diffs, writes each computed token into its page slot, and
before sampling reads the sequence back from the pages. A wrong block table, a page handed to two
requests, or a prefix hit on the wrong page shows up as an AssertionError. Its "model" is
``next_token(tokens)``, a pure function of the sequence, so outputs are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mlxserve.engine.config import CacheConfig, SchedulerConfig
from mlxserve.engine.request import EngineRequest
from mlxserve.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from mlxserve.sampling.params import SamplingParams


def make_request(
    request_id: str,
    prompt: Sequence[int],
    *,
    max_tokens: int = 16,
    eos: Sequence[int] = (),
    stop_token_ids: Sequence[int] = (),
    adapter_id: str | None = None,
    cache_salt: str | None = None,
    arrival_time: float = 0.0,
) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(max_tokens=max_tokens, stop_token_ids=tuple(stop_token_ids)),
        arrival_time=arrival_time,
        adapter_id=adapter_id,
        cache_salt=cache_salt,
        eos_token_ids=frozenset(eos),
    )


def default_next_token(tokens: Sequence[int]) -> int:
    """A deterministic "model": depends on the last token and the length; ids in [1000, 1500)."""
    return 1000 + (tokens[-1] * 31 + len(tokens) * 7) % 500


def make_scheduler(
    *,
    num_pages: int,
    page_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_prefill_chunk: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
    sliding_window: int | None = None,
    clock: Callable[[], float] | None = None,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_prefill_chunk=max_prefill_chunk,
        max_model_len=max_model_len,
    )
    cache = CacheConfig(
        page_size=page_size,
        num_pages=num_pages,
        enable_prefix_caching=enable_prefix_caching,
        sliding_window=sliding_window,
    )
    if clock is None:
        return Scheduler.from_config(config, cache)
    return Scheduler.from_config(config, cache, clock=clock)


@dataclass
class _RunnerSeq:
    tokens: list[int]
    block_ids: list[int]


@dataclass
class PageRunner:
    page_size: int
    next_token: Callable[[Sequence[int]], int] = default_next_token
    sliding_window: int | None = None
    sample_every_row: bool = False  # also return a (junk) token for mid-prefill rows
    seqs: dict[str, _RunnerSeq] = field(default_factory=dict)
    pages: dict[tuple[int, int], int] = field(default_factory=dict)  # (page, offset) -> token id

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in (*out.finished_ids, *out.preempted_ids):
            self.seqs.pop(request_id, None)
        rows: list[tuple[str, bool]] = []
        for new in out.scheduled_new_reqs:
            assert new.request_id not in self.seqs, new.request_id
            self.seqs[new.request_id] = _RunnerSeq(list(new.token_ids), list(new.block_ids))
            n = out.num_scheduled_tokens[new.request_id]
            self._write(new.request_id, new.num_computed_tokens, new.token_ids[new.num_computed_tokens :][:n])
            rows.append((new.request_id, new.do_sample))
        for run in out.scheduled_running:
            seq = self.seqs[run.request_id]
            seq.block_ids.extend(run.new_block_ids)
            del seq.tokens[run.num_computed_tokens :]
            seq.tokens.extend(run.new_token_ids)
            assert out.num_scheduled_tokens[run.request_id] == len(run.new_token_ids)
            self._write(run.request_id, run.num_computed_tokens, run.new_token_ids)
            rows.append((run.request_id, run.do_sample))
        sampled = [(rid, self._sample(rid)) for rid, do_sample in rows if do_sample]
        if self.sample_every_row:
            sampled += [(rid, 7) for rid, do_sample in rows if not do_sample]
        return RunnerOutput(request_ids=[rid for rid, _ in sampled], sampled_token_ids=[[t] for _, t in sampled])

    def _slot(self, request_id: str, pos: int) -> tuple[int, int]:
        page = self.seqs[request_id].block_ids[pos // self.page_size]
        assert page != 0, f"{request_id} position {pos} maps to the null page"
        return page, pos % self.page_size

    def _first_key(self, query_pos: int) -> int:
        """Earliest position a query at ``query_pos`` attends to."""
        return 0 if self.sliding_window is None else max(0, query_pos - self.sliding_window + 1)

    def _check_context(self, request_id: str, query_pos: int) -> None:
        """The pages hold the sequence's tokens at every position the query attends to."""
        seq = self.seqs[request_id]
        for pos in range(self._first_key(query_pos), query_pos):
            assert self.pages.get(self._slot(request_id, pos)) == seq.tokens[pos], (request_id, pos)

    def _live_pages(self, request_id: str) -> list[int]:
        seq = self.seqs[request_id]
        return seq.block_ids[self._first_key(len(seq.tokens)) // self.page_size :]

    def _write(self, request_id: str, start: int, token_ids: Sequence[int]) -> None:
        self._check_context(request_id, start)
        for i, token_id in enumerate(token_ids):
            page, offset = self._slot(request_id, start + i)
            for other_id in self.seqs:  # a page being written belongs to one live request
                assert other_id == request_id or page not in self._live_pages(other_id), (request_id, other_id, page)
            self.pages[(page, offset)] = token_id

    def _sample(self, request_id: str) -> int:
        seq = self.seqs[request_id]
        last = len(seq.tokens) - 1
        self._check_context(request_id, last)
        assert self.pages[self._slot(request_id, last)] == seq.tokens[last], (request_id, last)
        return self.next_token(seq.tokens)


def expected_output(prompt: Sequence[int], max_tokens: int, eos: Sequence[int] = ()) -> list[int]:
    """What default_next_token generates for ``prompt`` when nothing interferes."""
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        token = default_next_token(tokens)
        tokens.append(token)
        out.append(token)
        if token in eos:
            break
    return out


def run_to_completion(sched: Scheduler, runner: PageRunner, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; returns request_id -> all new tokens, in order."""
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        for eo in sched.update_from_output(out, runner.execute(out)):
            outputs.setdefault(eo.request_id, []).extend(eo.new_token_ids)
    assert not sched.has_unfinished_requests(), "did not finish"
    runner.execute(sched.schedule())  # deliver the last finished_ids
    return outputs
