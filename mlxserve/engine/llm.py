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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from mlxserve.engine.core import EngineConfig, EngineCore
from mlxserve.engine.request import EngineOutput, EngineRequest
from mlxserve.generation.generate import Prompt, encode_prompt, make_sampling_params
from mlxserve.io.source import resolve_model_path
from mlxserve.models.loader import load_model
from mlxserve.sampling.params import SamplingParams
from mlxserve.tokenizer.detokenizer import IncrementalDetokenizer
from mlxserve.tokenizer.wrapper import Tokenizer


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
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, **sampling: Any
    ) -> list[CompletionResult]:
        """Run every prompt to completion, batched; one result per prompt, in order."""
        params = make_sampling_params(params, **sampling)
        params.validate_for_vocab(self.tokenizer.vocab_size)
        pending: dict[str, _Pending] = {}
        order = []
        for prompt in prompts:
            request_id = f"llm-{next(self._ids)}"
            ids = encode_prompt(self.tokenizer, prompt)
            eos = frozenset(self.tokenizer.eos_token_ids) | frozenset(params.stop_token_ids)
            self.engine.add_request(EngineRequest(request_id, tuple(ids), params, eos_token_ids=eos))
            pending[request_id] = _Pending(IncrementalDetokenizer(self.tokenizer, stop=params.stop), len(ids), eos)
            order.append(request_id)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                self._absorb(pending[output.request_id], output)
        return [pending[i].result for i in order]

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
