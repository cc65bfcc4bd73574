"""AsyncEngine on its own: the actor thread, forks, aborts, admission, faults, death, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

import mlxserve
from mlxserve.engine.async_engine import AsyncEngine, AsyncEngineConfig, EngineState
from mlxserve.engine.core import EngineConfig
from mlxserve.engine.llm import _fork_params
from mlxserve.engine.request import EngineRequest
from mlxserve.errors import (
    EngineDeadError,
    EngineStepError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)
from mlxserve.sampling.params import SamplingParams

MESSAGES = [{"role": "user", "content": "The sky is"}]


def make_engine(ckpt, *, max_running=4, max_queue=2, failures=3, loader=None) -> AsyncEngine:
    config = EngineConfig(kv_memory_gb=0.01, max_num_seqs=max_running, max_num_batched_tokens=256,
                          max_prefill_chunk=256)
    engine = AsyncEngine.from_model_path(
        ckpt, config, config=AsyncEngineConfig(max_queue=max_queue, max_consecutive_failures=failures)
    )
    if loader is not None:
        engine._model_loader = loader
    engine.start()
    return engine


def requests(engine, prompt_ids, n=1, request_id="r", **sampling):
    params = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **sampling})
    eos = engine.tokenizer.eos_token_ids
    return [EngineRequest(f"{request_id}-{i}", prompt_ids, _fork_params(params, i), eos_token_ids=eos)
            for i in range(n)]


async def run(engine, groups):
    stream = await engine.submit(groups, engine.reserve(sum(len(g) for g in groups)))
    out: dict[int, list] = {}
    async for delta in stream.deltas():
        out.setdefault(delta.index, []).append(delta)
    return [out[i] for i in sorted(out)]


def test_greedy_text_equals_mlxserve_generate_and_pages_come_back(ckpt, reference):
    engine = make_engine(ckpt)
    engine.wait_loaded()
    prompt = engine.tokenizer.encode_chat(MESSAGES)

    async def main():
        (deltas,) = await run(engine, [requests(engine, prompt, max_tokens=12)])
        await engine.shutdown()
        return deltas

    deltas = asyncio.run(main())
    model, tokenizer = reference
    assert "".join(d.text for d in deltas) == mlxserve.generate(model, tokenizer, MESSAGES, max_tokens=12)
    assert [d.finish_reason for d in deltas] == [None] * 11 + ["length"]
    assert sum(d.num_new_tokens for d in deltas) == 12
    assert {d.num_prompt_tokens for d in deltas} == {len(prompt)}
    assert engine.metrics().num_pages_used == 0 and engine.state is EngineState.STOPPED


def test_forks_share_the_prompt_and_seeds_make_them_differ_reproducibly(ckpt):
    engine = make_engine(ckpt, max_running=8)
    engine.wait_loaded()
    prompt = engine.tokenizer.encode("a long enough prompt to fill two pages of sixteen tokens, at least")
    assert len(prompt) > 32

    async def main():
        one = await run(engine, [requests(engine, prompt, n=3, request_id="a", temperature=1.0, seed=5)])
        two = await run(engine, [requests(engine, prompt, n=3, request_id="b", temperature=1.0, seed=5)])
        await engine.shutdown()
        return one, two

    one, two = asyncio.run(main())
    texts = ["".join(d.text for d in choice) for choice in one]
    assert texts == ["".join(d.text for d in choice) for choice in two]
    assert len(set(texts)) == 3  # each fork samples with its own seed
    cached = [choice[0].num_cached_tokens for choice in one]
    assert cached[0] == 0 and cached[1:] == [len(prompt) // 16 * 16] * 2  # forks reuse the first's full pages


def test_closing_a_stream_aborts_it_and_frees_its_pages(ckpt):
    engine = make_engine(ckpt)
    engine.wait_loaded()
    prompt = engine.tokenizer.encode_chat(MESSAGES)

    async def main():
        stream = await engine.submit([requests(engine, prompt, max_tokens=200)], engine.reserve(1))
        deltas = stream.deltas()
        await deltas.__anext__()
        await deltas.aclose()
        assert engine.num_reserved == 0
        start = time.monotonic()
        while not engine.metrics().recent_timings or engine.metrics().num_pages_used:
            assert time.monotonic() - start < 1.0, engine.metrics()
            await asyncio.sleep(0.005)
        assert engine.metrics().num_running == 0
        timing = engine.metrics().recent_timings[-1]
        await engine.shutdown()
        return timing

    timing = asyncio.run(main())
    assert timing.finish_reason == "abort" and timing.num_output_tokens < 200


def test_admission_is_bounded_by_running_plus_queue(ckpt):
    engine = make_engine(ckpt, max_running=2, max_queue=1)
    engine.wait_loaded()

    async def main():
        first = engine.reserve(2)
        engine.reserve(1)
        with pytest.raises(OverloadedError) as info:
            engine.reserve(1)
        first.release()
        first.release()  # idempotent
        engine.reserve(2)
        with pytest.raises(InvalidRequestError) as too_many:
            engine.reserve(4)
        await engine.shutdown()
        return info.value, too_many.value

    overloaded, too_many = asyncio.run(main())
    assert (overloaded.http_status, overloaded.code, overloaded.retry_after) == (503, "server_is_overloaded", 1)
    assert (too_many.http_status, too_many.param) == (400, "n")


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(ckpt):
    engine = make_engine(ckpt)
    engine.wait_loaded()
    prompt = engine.tokenizer.encode_chat(MESSAGES)
    original = engine.core.step
    calls = []

    def fail_once():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("[metal::malloc] injected")
        return original()

    engine.core.step = fail_once

    async def main():
        with pytest.raises(EngineStepError):
            await run(engine, [requests(engine, prompt, n=2, max_tokens=20)])
        assert engine.num_reserved == 0
        (canary,) = await run(engine, [requests(engine, prompt, request_id="c")])
        await engine.shutdown()
        return canary

    canary = asyncio.run(main())
    assert canary[-1].finish_reason == "length" and engine.metrics().num_pages_used == 0


def test_repeated_failures_kill_the_engine_and_new_requests_get_503(ckpt):
    engine = make_engine(ckpt, failures=2)
    engine.wait_loaded()
    prompt = engine.tokenizer.encode_chat(MESSAGES)

    def broken():
        raise RuntimeError("injected")

    engine.core.step = broken

    async def main():
        errors = []
        for i in range(2):
            with pytest.raises(EngineStepError) as info:
                await run(engine, [requests(engine, prompt, request_id=f"x{i}")])
            errors.append(info.value)
        start = time.monotonic()
        while engine.state is not EngineState.DEAD:
            assert time.monotonic() - start < 1.0
            await asyncio.sleep(0.005)
        with pytest.raises(EngineDeadError) as dead:
            engine.reserve(1)
        return dead.value

    dead = asyncio.run(main())
    assert (dead.http_status, dead.code) == (503, "engine_unavailable")


def test_a_load_failure_is_reported_not_hung(ckpt):
    def fail():
        raise OSError("weights are gone")

    engine = make_engine(ckpt, loader=fail)
    with pytest.raises(EngineDeadError) as info:
        engine.wait_loaded(timeout=5)
    assert info.value.message == "the engine failed to start: OSError: weights are gone"
    assert engine.state is EngineState.DEAD


def test_shutdown_ends_open_streams_and_refuses_new_ones(ckpt):
    engine = make_engine(ckpt)
    engine.wait_loaded()
    prompt = engine.tokenizer.encode_chat(MESSAGES)

    async def main():
        original = engine.core.step
        engine.core.step = lambda: (time.sleep(0.01), original())[1]
        stream = await engine.submit([requests(engine, prompt, max_tokens=200)], engine.reserve(1))
        deltas = stream.deltas()
        await deltas.__anext__()
        await engine.shutdown()
        with pytest.raises(ShuttingDownError):
            async for _ in deltas:
                pass
        with pytest.raises(ShuttingDownError):
            engine.reserve(1)

    asyncio.run(main())
    assert engine.state is EngineState.STOPPED
