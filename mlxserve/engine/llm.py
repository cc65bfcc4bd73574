"""``mlxserve.LLM``: offline batch generation over the engine (continuous batching, paged KV).

    llm = mlxserve.LLM("path/to/model", kv_memory_gb=2)
    for result in llm.generate(["Hello", "The sky is"], max_tokens=32, temperature=0):
        print(result.text, result.finish_reason)

Prompts are strings, token-id lists or chat message lists; sampling keywords are those of
``mlxserve.generate``. Results come back in prompt order. Stop strings are found by each request's
detokenizer, which then aborts the request in the engine (its pages are freed at once).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

from mlxserve.engine.core import EngineConfig, EngineCore
from mlxserve.engine.request import EngineOutput, EngineRequest
from mlxserve.errors import InvalidRequestError
from mlxserve.generation.generate import Prompt, encode_prompt, make_sampling_params
from mlxserve.io.source import resolve_model_path
from mlxserve.models.loader import load_model
from mlxserve.sampling.params import SamplingParams
from mlxserve.tokenizer.detokenizer import IncrementalDetokenizer
from mlxserve.tokenizer.wrapper import Tokenizer


MAX_N = 16


def _fork_params(params: SamplingParams, index: int) -> SamplingParams:
    """Fork ``index`` of a request: its own seed, so the n samples differ yet stay reproducible."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index * 0x9E3779B1) % 2**63)


@dataclass(frozen=True)
class CompletionResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: tuple[float, ...]  # of each generated token


@dataclass
class _Pending:
    detokenizer: IncrementalDetokenizer
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    num_cached_tokens: int = 0
    result: CompletionResult | None = None


class LLM:
    def __init__(self, model: str | Path, *, revision: str | None = None, **engine_options: Any) -> None:
        path = resolve_model_path(str(model), revision=revision)
        self.model = load_model(path).model
        self.tokenizer = Tokenizer.from_pretrained(path)
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        self.engine = EngineCore(self.model, EngineConfig(**engine_options))
        self._ids = itertools.count()

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, *, n: int = 1, **sampling: Any
    ) -> list[CompletionResult]:
        """Run every prompt to completion, batched; ``n`` results per prompt, prompt-major, in order.

        The ``n`` samples of one prompt are forks: the first computes the prompt, the others start
        once its pages are cached and share them. Each fork samples with its own seed.
        """
        if not 1 <= n <= MAX_N:
            raise InvalidRequestError(f"`n` must be in [1, {MAX_N}], got {n}", param="n")
        params = make_sampling_params(params, **sampling)
        params.validate_for_vocab(self.tokenizer.vocab_size)
        pending: dict[str, _Pending] = {}
        forks: dict[str, list[EngineRequest]] = {}  # first sample's id -> requests waiting for its prefill
        order = []
        eos = frozenset(self.tokenizer.eos_token_ids) | frozenset(params.stop_token_ids)
        for prompt in prompts:
            ids = tuple(encode_prompt(self.tokenizer, prompt))
            requests = [EngineRequest(f"llm-{next(self._ids)}", ids, _fork_params(params, i), eos_token_ids=eos)
                        for i in range(n)]
            self.engine.add_request(requests[0])
            forks[requests[0].request_id] = requests[1:]
            for request in requests:
                pending[request.request_id] = _Pending(IncrementalDetokenizer(self.tokenizer, stop=params.stop), len(ids), eos)
                order.append(request.request_id)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                for fork in forks.pop(output.request_id, ()):  # its prompt pages are cached now
                    self.engine.add_request(fork)
                self._absorb(pending[output.request_id], output)
        return [pending[i].result for i in order]

    @property
    def metrics(self):
        return self.engine.metrics()

    def _absorb(self, state: _Pending, output: EngineOutput) -> None:
        if state.result is not None:
            return
        state.num_cached_tokens = output.num_cached_tokens
        state.token_ids += tuple(output.new_token_ids)
        state.logprobs += tuple(output.new_logprobs or ())
        text_ids = [t for t in output.new_token_ids if t != output.stop_token_id]
        delta = state.detokenizer.update(text_ids)
        state.text += delta.text
        finish = output.finish_reason.value if output.finish_reason is not None else None
        if delta.stop_string is not None:
            self.engine.abort_request(output.request_id)
            finish = "stop"
        if finish is not None:
            if delta.stop_string is None:
                state.text += state.detokenizer.finish().text
            state.result = CompletionResult(
                text=state.text, token_ids=state.token_ids, finish_reason=finish,
                num_prompt_tokens=state.num_prompt_tokens, num_cached_tokens=state.num_cached_tokens,
                logprobs=state.logprobs,
            )
