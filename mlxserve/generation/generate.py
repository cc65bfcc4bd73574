"""``generate`` and ``stream_generate``: text in, text out, for one stream.

A prompt is a string, a list of token ids, or chat messages (rendered with the model's chat
template). Text comes out through the incremental detokenizer, which never emits broken UTF-8 nor
any part of a stop string. The last response carries the finish reason and timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxserve.errors import InvalidRequestError
from mlxserve.generation.prompt_cache import PromptCache
from mlxserve.generation.steps import DEFAULT_PREFILL_STEP, generate_tokens
from mlxserve.sampling.params import SamplingParams
from mlxserve.tokenizer.detokenizer import IncrementalDetokenizer
from mlxserve.tokenizer.wrapper import Tokenizer

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # new text since the previous response
    token: int  # the token sampled at this step
    logprob: float  # its log-probability
    logprobs: mx.array  # (V,) the distribution it was drawn from
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None = None  # "stop" | "length" on the last response
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt given as text, ids, or chat messages."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        return tokenizer.encode_chat(items, add_generation_prompt=True)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        bad = [t for t in items if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
        return items
    raise InvalidRequestError("prompt must be a string, a list of token ids or a list of messages", param="prompt")


def make_sampling_params(params: SamplingParams | None, **kwargs: Any) -> SamplingParams:
    """SamplingParams from an object and/or keyword overrides (``max_tokens=``, ``temperature=`` ...)."""
    if "temp" in kwargs:  # mlx-lm's spelling
        kwargs["temperature"] = kwargs.pop("temp")
    if params is None:
        return SamplingParams(**kwargs)
    return replace(params, **kwargs) if kwargs else params


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    params: SamplingParams | None = None,
    *,
    max_kv_size: int | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_step: int = DEFAULT_PREFILL_STEP,
    **sampling: Any,
) -> Iterator[GenerationResponse]:
    """Yield a ``GenerationResponse`` per token; the last one has ``finish_reason`` set.

    ``prompt_cache`` keeps the KV cache across calls (multi-turn chat): only the part of the
    prompt after the longest cached prefix is computed.
    """
    params = make_sampling_params(params, **sampling)
    prompt_ids = encode_prompt(tokenizer, prompt)
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if prompt_cache is None:
        prompt_cache = PromptCache(model, max_kv_size=max_kv_size)
    history, new_ids = prompt_cache.prepare(prompt_ids)
    stop_ids = set(params.stop_token_ids) | set(tokenizer.eos_token_ids)
    detok = IncrementalDetokenizer(tokenizer, stop=params.stop)
    steps = generate_tokens(
        model, new_ids, params, cache=prompt_cache.cache, history_ids=history,
        prefill_step=prefill_step, on_token_fed=prompt_cache.record,
    )
    yield from _responses(steps, detok, params, stop_ids, len(prompt_ids))


def _responses(steps, detok, params, stop_ids, num_prompt) -> Iterator[GenerationResponse]:
    """Turn token steps into text responses, applying stop tokens, stop strings and max_tokens."""
    mx.reset_peak_memory()
    gen_start = None
    for n, step in enumerate(steps, start=1):
        gen_start = gen_start or time.perf_counter()
        finish = None
        if step.token in stop_ids:
            delta, finish = detok.finish(), "stop"
        else:
            delta = detok.update([step.token])
            if delta.stop_string is not None:
                finish = "stop"
            elif n >= params.max_tokens:
                delta, finish = _join(delta, detok.finish()), "length"
        stats = {}
        if finish is not None:
            elapsed = max(time.perf_counter() - gen_start, 1e-9)
            stats = dict(
                prompt_tps=num_prompt / max(step.prompt_time, 1e-9),
                generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
            )
        yield GenerationResponse(
            text=delta.text, token=step.token, logprob=step.logprob,
            logprobs=step.logprobs, prompt_tokens=num_prompt, generation_tokens=n,
            finish_reason=finish, **stats,
        )
        if finish is not None:
            return


def _join(a, b):
    return replace(a, text=a.text + b.text)


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    params: SamplingParams | None = None,
    **kwargs: Any,
) -> str:
    """The whole completion as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, params, **kwargs))
