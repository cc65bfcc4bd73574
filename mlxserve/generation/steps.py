"""The token loop: chunked prefill, then decode pipelined the MLX way.

``generate_tokens`` yields one ``TokenStep`` per sampled token. Step N+1 is queued with
``mx.async_eval`` before step N's token is read on the host, so the GPU (or the CPU's worker
threads) never wait for Python between tokens. Everything here is lazy except that one read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxserve.sampling.params import SamplingParams
from mlxserve.sampling.processors import make_logits_processors
from mlxserve.sampling.sampler import Sampler

DEFAULT_PREFILL_STEP = 2048


@dataclass(frozen=True)
class TokenStep:
    token: int
    logprob: float  # logprobs[token]
    logprobs: mx.array  # (V,) log-probabilities of the distribution the token was drawn from
    prompt_time: float  # seconds from start to the first token being ready (same on every step)


def prefill(model: nn.Module, tokens: mx.array, cache: list, step: int = DEFAULT_PREFILL_STEP) -> mx.array:
    """Run all of ``tokens`` but the last through the model in chunks; returns the last token.

    Chunking bounds the activation memory of long prompts; the cache is evaluated after every
    chunk so the graph never spans the whole prompt.
    """
    while tokens.size > 1:
        n = min(step, tokens.size - 1)
        model(tokens[None, :n], cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
        if n == step:
            mx.clear_cache()
    return tokens


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    cache: list,
    history_ids: Sequence[int] = (),
    prefill_step: int = DEFAULT_PREFILL_STEP,
    on_token_fed: Callable[[int], None] | None = None,
) -> Iterator[TokenStep]:
    """Yield sampled tokens forever (the caller stops); ``prompt_ids`` are fed after the cache.

    ``history_ids``: tokens already in ``cache`` (for penalties that look back over the context).
    ``on_token_fed``: called with each sampled token once it has been fed back to the model, so a
    prompt cache can record exactly which tokens its KV holds.
    """
    if len(prompt_ids) == 0:
        raise ValueError("generate_tokens needs at least one new prompt token")
    start = time.perf_counter()
    sampler = Sampler(params)
    processors = make_logits_processors(params)
    num_prompt = len(history_ids) + len(prompt_ids)
    context = mx.array(list(history_ids) + list(prompt_ids), dtype=mx.int32)

    def step(inputs: mx.array, context: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(inputs[None], cache)[:, -1, :]
        for processor in processors:
            logits = processor(context, num_prompt, logits)
        result = sampler(logits)
        # squeeze, not [0]: an integer index is a gather, i.e. a (V,) copy per token.
        return result.token_ids, result.logprobs.squeeze(0)

    last = prefill(model, mx.array(list(prompt_ids), dtype=mx.int32), cache, prefill_step)
    token, logprobs = step(last, context)
    mx.async_eval(token, logprobs)
    prompt_time = None
    while True:
        context = mx.concatenate([context, token]) if processors else context
        next_token, next_logprobs = step(token, context)
        mx.async_eval(next_token, next_logprobs)
        token_id = token.item()  # SYNC: the one host read per generated token
        if prompt_time is None:
            prompt_time = time.perf_counter() - start
        if on_token_fed is not None:
            on_token_fed(token_id)
        logprob = _read_logprob(logprobs, token_id)
        yield TokenStep(token=token_id, logprob=logprob, logprobs=logprobs, prompt_time=prompt_time)
        token, logprobs = next_token, next_logprobs


def _read_logprob(logprobs: mx.array, token_id: int) -> float:
    """``logprobs[token_id]`` read on the host, without queueing an op.

    ``logprobs`` was queued before the next step, so its buffer is ready (or nearly). Indexing it
    with MLX instead (``logprobs[token_id].item()``) would queue a new op *behind* the next step
    and wait for the whole of it: the pipeline would stall on every token.
    """
    if logprobs.dtype == mx.float32:
        return float(memoryview(logprobs)[token_id])
    return logprobs[token_id].item()  # no buffer protocol for bfloat16; the sampler emits float32
