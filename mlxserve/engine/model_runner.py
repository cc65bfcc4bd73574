"""ModelRunner.execute(SchedulerOutput) -> RunnerOutput: one engine step on the model.

All decoding rows run together as one (R, 1) batch; prefilling rows run in padded batches of
similar lengths (see ``group_rows``). Greedy rows without logits processors sample together with one
argmax; the others sample one by one with their own parameters and seed (keyed by output index, so
a request samples the same tokens alone, batched, or recomputed). The step ends with its single
host read of the sampled tokens.

Lookahead: when every row that sampled is plain greedy, the step builds the next step's decode
forward from its still-lazy sampled tokens and dispatches it (``mx.async_eval``) before its host
read, so the scheduler's and the caller's Python work overlaps the model (as mlx-lm's generation
loop does). The next step uses those results only if it schedules exactly the predicted rows (same
requests in the same order, positions, tokens and pages), which makes them the very computation it
would have run; otherwise it drops them. A dropped lookahead only wrote K/V at each row's next
position, in a page the row owned: a slot the row rewrites when it runs again, or a slot of a freed
page that is not full (so it is not in the prefix cache) and that a new owner overwrites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
    block_ids: Sequence[int]  # the request's block table (the runner's live list)
    do_sample: bool

    @property
    def num_new(self) -> int:
        return len(self.tokens)


# A prefill batch pads every row to its longest one; it may compute at most this much more than its rows need.
MAX_PREFILL_PADDING = 1.25


def group_rows(rows: list[_Row]) -> list[list[_Row]]:
    """Rows -> forwards: every one-token row together, last; longer rows longest first, packed greedily
    while padding to the group's longest row costs at most ``MAX_PREFILL_PADDING`` x their tokens."""
    groups: list[list[_Row]] = []
    for row in sorted((r for r in rows if r.num_new > 1), key=lambda r: -r.num_new):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * group[0].num_new <= MAX_PREFILL_PADDING * (
            sum(r.num_new for r in group) + row.num_new
        ):
            group.append(row)
        else:
            groups.append([row])
    decode = [r for r in rows if r.num_new == 1]
    return groups + [decode] if decode else groups


@dataclass(frozen=True)
class _Logits:
    """The last logits of one forward's sampling rows."""

    request_ids: tuple[str, ...]
    logits: mx.array | None  # (G, V); None when no row samples (mid-prefill chunks only)


@dataclass(frozen=True)
class _Sampled:
    """Tokens sampled in one step, lazy until the host read."""

    request_ids: tuple[str, ...]
    token_ids: mx.array  # (R,) int32
    logprobs: mx.array  # (R,) float32 of each sampled token


@dataclass(frozen=True)
class _Queued:
    """A lookahead forward built from lazy samples: its rows carry placeholder tokens."""

    rows: list[_Row]
    sampled: _Sampled

    def expecting(self, token_of: dict[str, int], page_size: int) -> _Lookahead:
        """What the next step must schedule to use it, now that the input tokens are known."""
        P = -(-max(r.start + 1 for r in self.rows) // page_size)  # as BatchLayout.build
        expected = tuple(
            _Row(r.request_id, r.start, (token_of[r.request_id],), tuple(r.block_ids[:P]), True) for r in self.rows
        )
        return _Lookahead(expected, P, self.sampled)


@dataclass(frozen=True)
class _Lookahead:
    """A decode forward dispatched ahead of its step, and the rows that step must schedule to use it."""

    rows: tuple[_Row, ...]  # tokens as sampled; block_ids: the first num_pages entries, as read
    num_pages: int  # pages of each block table the forward gathered
    sampled: _Sampled

    def matches(self, rows: list[_Row]) -> bool:
        P = self.num_pages
        return len(rows) == len(self.rows) and all(
            r.request_id == e.request_id and r.start == e.start and r.tokens == e.tokens and r.do_sample
            and tuple(r.block_ids[:P]) == e.block_ids
            for r, e in zip(rows, self.rows)
        )


class ModelRunner:
    def __init__(
        self, model: nn.Module, store: PagedKVStore, windows: list[int | None], *, lookahead: bool = True
    ) -> None:
        self.model = model
        self.store = store
        self.windows = windows  # per layer: sliding window or None
        self._distinct_windows = tuple(dict.fromkeys(windows))
        self.states: dict[str, _RequestState] = {}
        self.lookahead = lookahead  # False: the plain synchronous step, the twin tests compare it with
        self._ahead: _Lookahead | None = None
        self._last_cache: list[PagedLayerCache] = []  # the per-layer views of the forward built last

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for request_id in (*out.finished_ids, *out.preempted_ids):
            self.states.pop(request_id, None)
        groups = group_rows(self._rows(out))
        ahead, self._ahead = self._ahead, None
        done = None
        if ahead is not None and groups and ahead.matches(groups[-1]):
            done, groups = ahead.sampled, groups[:-1]
        elif ahead is not None:
            mx.eval(ahead.sampled.token_ids)  # dropped: let it finish before anything else is dispatched
        pending = [done.token_ids] if done is not None else []
        forwards: list[_Logits] = []
        for group in groups:
            # NOTE(engine): MLX writes an arena in place only if its scatter is the arena's sole user when
            # dispatched. Every earlier forward must have finished (its gathers read the arenas); if
            # not, MLX copies each arena whole.
            mx.eval(pending, self.store.arrays)
            forwards.append(self._forward(group))
            pending = [forwards[-1].logits] if forwards[-1].logits is not None else []
        sampled = self._sample(forwards, done)
        if sampled is None:
            mx.eval(pending, self.store.arrays)
            return RunnerOutput(request_ids=(), sampled_token_ids=())
        return self._finish_step(out, sampled)

    def _finish_step(self, out: SchedulerOutput, sampled: _Sampled) -> RunnerOutput:
        """Dispatch the lookahead, complete this step, and read its tokens (the step's one host read)."""
        reads = [c.read for c in self._last_cache]  # this step's last forward: the earlier ones are done
        queued = self._look_ahead(out, sampled)
        if queued is None:
            mx.eval(sampled.token_ids, sampled.logprobs, self.store.arrays)
        else:
            # Dispatch the lookahead layer by layer, each once this step has read that layer's arena:
            # its write is then in place (see execute), and it overlaps the rest of this step.
            for read, arena in zip(reads, self.store.arrays):
                mx.eval(read)
                mx.async_eval(arena)
            mx.async_eval(queued.sampled.token_ids, queued.sampled.logprobs)
            mx.eval(sampled.token_ids, sampled.logprobs)
        sampled_ids = sampled.token_ids.tolist()  # SYNC: the one host read of this step
        values = sampled.logprobs.tolist()
        token_of = dict(zip(sampled.request_ids, sampled_ids))
        for request_id, token in token_of.items():
            self.states[request_id].token_ids.append(token)
        if queued is not None:
            self._ahead = queued.expecting(token_of, self.store.page_size)
        return RunnerOutput(
            request_ids=sampled.request_ids, sampled_token_ids=[[t] for t in sampled_ids],
            logprobs=[[v] for v in values],
        )

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

    def _forward(self, rows: list[_Row], inputs: mx.array | None = None) -> _Logits:
        """Run rows through the model as one padded batch; returns the sampling rows' last logits.
        ``inputs`` (B, L) int32 replaces the rows' tokens (the lookahead feeds lazy samples)."""
        layout = BatchLayout.build(rows, self.store, self._distinct_windows)
        L = max(r.num_new for r in rows)
        if inputs is None:
            tokens = np.zeros((len(rows), L), np.int32)
            for b, r in enumerate(rows):
                tokens[b, : r.num_new] = r.tokens
            inputs = mx.array(tokens)
        cache = [PagedLayerCache(self.store, i, layout, w) for i, w in enumerate(self.windows)]
        self._last_cache = cache
        sampling = [b for b, r in enumerate(rows) if r.do_sample]
        request_ids = tuple(rows[b].request_id for b in sampling)
        if L == 1 and len(sampling) == len(rows):
            return _Logits(request_ids, self.model(inputs, cache)[:, 0])
        if not sampling:  # K/V writes only: the logits are never evaluated, so never computed
            self.model(inputs, cache)
            return _Logits(request_ids, None)
        last = [rows[b].num_new - 1 for b in sampling]
        logits = _LastPositions(self.model, sampling, last)(inputs, cache)  # (G, 1, V)
        return _Logits(request_ids, logits[:, 0])

    def _sample(self, forwards: list[_Logits], done: _Sampled | None) -> _Sampled | None:
        """Sample every forward's rows; ``done``: rows the lookahead already sampled."""
        parts = [done] if done is not None else []
        greedy_ids: list[str] = []
        greedy_logits: list[mx.array] = []
        for f in (f for f in forwards if f.logits is not None):
            plain = [self._is_plain_greedy(request_id) for request_id in f.request_ids]
            if all(plain):
                greedy_ids += f.request_ids
                greedy_logits.append(f.logits)
                continue
            for g, request_id in enumerate(f.request_ids):
                if plain[g]:
                    greedy_ids.append(request_id)
                    greedy_logits.append(f.logits[g : g + 1])
                else:
                    parts.append(self._sample_row(request_id, f.logits[g : g + 1]))
        if greedy_ids:
            parts.append(_greedy(tuple(greedy_ids), _concat(greedy_logits)))
        if not parts:
            return None
        return _Sampled(
            tuple(i for p in parts for i in p.request_ids),
            _concat([p.token_ids for p in parts]), _concat([p.logprobs for p in parts]),
        )

    def _is_plain_greedy(self, request_id: str) -> bool:
        state = self.states[request_id]
        return state.sampler.params.is_greedy and not state.processors

    def _sample_row(self, request_id: str, logits: mx.array) -> _Sampled:
        """One row with its own processors, parameters and seed."""
        state = self.states[request_id]
        if state.processors:
            context = mx.array(state.token_ids, dtype=mx.int32)
            for processor in state.processors:
                logits = processor(context, state.num_prompt_tokens, logits)
        index = len(state.token_ids) - state.num_prompt_tokens  # output index: same alone or batched
        result = state.sampler(logits, index=index)
        logprob = mx.take_along_axis(result.logprobs, result.token_ids[:, None], axis=-1)[:, 0]
        return _Sampled((request_id,), result.token_ids, logprob)

    # ---- lookahead -------------------------------------------------------------------------------

    def _look_ahead(self, out: SchedulerOutput, sampled: _Sampled) -> _Queued | None:
        """Build (lazily) the decode forward the next step will most likely run; None if unpredictable.

        Its rows: this step's sampling rows in the scheduler's running order (older requests first,
        then this step's admissions), less those that reach max_tokens now. Unpredictable: a row
        that samples otherwise than plain greedy, or whose next token needs a page not yet given.
        """
        if not self.lookahead:
            return None
        index = {request_id: i for i, request_id in enumerate(sampled.request_ids)}
        order = [r.request_id for r in out.scheduled_running] + [r.request_id for r in out.scheduled_new_reqs]
        rows = []
        for request_id in (i for i in order if i in index):
            state = self.states[request_id]
            start = len(state.token_ids)  # position of the token sampled now
            if not self._is_plain_greedy(request_id) or start >= len(state.block_ids) * self.store.page_size:
                return None
            if start + 1 - state.num_prompt_tokens < state.sampler.params.max_tokens:
                rows.append(_Row(request_id, start, (0,), state.block_ids, True))
        if not rows:
            return None
        take = [index[r.request_id] for r in rows]
        inputs = sampled.token_ids if take == list(range(len(index))) else sampled.token_ids[mx.array(take)]
        logits = self._forward(rows, inputs.reshape(-1, 1))
        return _Queued(rows, _greedy(logits.request_ids, logits.logits))


class _LastPositions:
    """Stands in for ``model`` in its own ``__call__`` so that its LM head sees only some positions.

    NOTE(engine): every model family here computes ``head(self.model(inputs, cache))`` (llama,
    gemma2 and the families built on them). With ``.model`` swapped for a stack that returns only
    the hidden states at (rows[i], cols[i]), the head and any final logit step (Gemma's soft-cap)
    run on those G positions instead of all B x L: a prefill chunk skips most of its lm_head work
    (a quarter of Qwen2.5-0.5B's prefill) and its (B, L, vocab) logits. The invariance tests of
    every architecture check the result; a ``Model.logits(hidden)`` method would replace this.
    """

    def __init__(self, model: nn.Module, rows: list[int], cols: list[int]) -> None:
        self._model = model
        self.model = _StackAt(model.model, mx.array(rows, dtype=mx.int32), mx.array(cols, dtype=mx.int32))

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        """inputs (B, L) -> logits (G, 1, vocab)."""
        return type(self._model).__call__(self, inputs, cache)


class _StackAt:
    """A decoder stack that returns the hidden states of some positions only: (G, 1, D)."""

    def __init__(self, stack: nn.Module, rows: mx.array, cols: mx.array) -> None:
        self._stack, self._rows, self._cols = stack, rows, cols

    def __getattr__(self, name: str):
        return getattr(self._stack, name)  # embed_tokens, for tied heads

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        return self._stack(inputs, cache)[self._rows, self._cols][:, None]


def _concat(arrays: list[mx.array]) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)


def _greedy(request_ids: tuple[str, ...], logits: mx.array) -> _Sampled:
    """Rows sampled greedily together: (G, V) logits. The values ``Sampler`` gives each row (argmax;
    chosen logit minus logsumexp), and row reductions do not depend on the other rows, so a row's
    token and logprob do not depend on its batch."""
    if logits.dtype != mx.float32:
        logits = logits.astype(mx.float32)
    token_ids = mx.argmax(logits, axis=-1).astype(mx.int32)
    # The chosen logit is the row's max: one reduction instead of a gather of the argmax.
    return _Sampled(request_ids, token_ids, mx.max(logits, axis=-1) - mx.logsumexp(logits, axis=-1))
