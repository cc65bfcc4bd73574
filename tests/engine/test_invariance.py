"""The engine must not change what a request produces: batched == alone, prefix cache on == off,
preempted and recomputed == uninterrupted, seeded sampling identical alone and batched."""

from __future__ import annotations

import pytest
from fixtures.reference import PROMPTS

import mlxserve
from mlxserve.engine.core import EngineConfig, EngineCore
from mlxserve.engine.request import EngineRequest
from mlxserve.sampling.params import SamplingParams

SMALL = dict(kv_memory_gb=0.01, max_prefill_chunk=16, max_num_batched_tokens=64)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


def _prompts(n: int = 16) -> list[list[int]]:
    """Mixed lengths, 3..37 tokens, some sharing prefixes."""
    return [PROMPTS[i % 3][: 3 + (i * 7) % 35] for i in range(n)]


def _alone(ckpt, prompts, **sampling) -> list[list[int]]:
    model, tokenizer = mlxserve.load(ckpt)
    return [[r.token for r in mlxserve.stream_generate(model, tokenizer, p, **sampling)] for p in prompts]


@pytest.mark.parametrize("arch", ARCHS)
def test_sixteen_concurrent_greedy_requests_equal_each_alone(tiny_ckpt, arch):
    ckpt = tiny_ckpt(arch)
    prompts = _prompts()
    llm = mlxserve.LLM(ckpt, **SMALL)
    results = llm.generate(prompts, max_tokens=12)
    assert [list(r.token_ids) for r in results] == _alone(ckpt, prompts, max_tokens=12)
    llm.engine.check_leaks()


def test_prefix_cache_on_equals_off_and_reports_hits(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    shared = PROMPTS[2]  # 37 tokens: two full pages of 16 to share
    prompts = [shared + [5 + i] for i in range(4)]
    on = mlxserve.LLM(ckpt, **SMALL)
    first = on.generate(prompts[:1], max_tokens=6)
    rest = on.generate(prompts[1:], max_tokens=6)
    off = mlxserve.LLM(ckpt, enable_prefix_caching=False, **SMALL)
    plain = off.generate(prompts, max_tokens=6)
    assert [r.token_ids for r in first + rest] == [r.token_ids for r in plain]
    assert first[0].num_cached_tokens == 0
    assert [r.num_cached_tokens for r in rest] == [32, 32, 32]  # two pages of 16 shared
    assert [r.num_cached_tokens for r in plain] == [0, 0, 0, 0]
    on.engine.check_leaks()


def test_a_budget_smaller_than_demand_completes_every_request_by_preemption(tiny_ckpt):
    ckpt = tiny_ckpt("qwen2")
    prompts = _prompts(8)
    # 8 requests x up to 37 + 24 tokens need far more than 12 pages of 16 tokens.
    llm = mlxserve.LLM(ckpt, kv_memory_gb=12 * 16 * 2 * 2 * 2 * 16 * 4 / 2**30, max_prefill_chunk=16,
                       max_num_batched_tokens=64, enable_prefix_caching=False)
    assert llm.engine.num_pages == 12
    results = llm.generate(prompts, max_tokens=24)
    assert llm.engine.metrics().num_preemptions > 0
    assert [list(r.token_ids) for r in results] == _alone(ckpt, prompts, max_tokens=24)
    llm.engine.check_leaks()


def test_seeded_sampling_is_identical_alone_and_batched(tiny_ckpt):
    ckpt = tiny_ckpt("gemma2")
    prompts = _prompts(6)
    sampling = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    results = mlxserve.LLM(ckpt, **SMALL).generate(prompts, **sampling)
    assert [list(r.token_ids) for r in results] == _alone(ckpt, prompts, **sampling)


def test_logprobs_equal_the_single_stream_ones(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    model, tokenizer = mlxserve.load(ckpt)
    single = [r.logprob for r in mlxserve.stream_generate(model, tokenizer, PROMPTS[1], max_tokens=8)]
    batched = mlxserve.LLM(ckpt, **SMALL).generate([PROMPTS[0], PROMPTS[1]], max_tokens=8)[1]
    assert batched.logprobs == pytest.approx(single, abs=1e-4)


def test_stop_strings_abort_in_the_engine(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    llm = mlxserve.LLM(ckpt, **SMALL)
    full = llm.generate([PROMPTS[0]], max_tokens=30)[0]
    stop = full.text[5:9]
    stopped = llm.generate([PROMPTS[0]], max_tokens=30, stop=(stop,))[0]
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.finish_reason == "stop"
    llm.engine.check_leaks()


@pytest.mark.parametrize("when", ["mid-prefill", "mid-decode"])
def test_abort_frees_every_page(tiny_ckpt, when):
    model, _ = mlxserve.load(tiny_ckpt("llama"))
    engine = EngineCore(model, EngineConfig(**SMALL))
    params = SamplingParams(max_tokens=50)
    engine.add_request(EngineRequest("a", tuple(PROMPTS[2]), params))
    engine.add_request(EngineRequest("b", tuple(PROMPTS[1]), params))
    engine.step()  # 16 tokens of "a": mid-prefill
    if when == "mid-decode":
        for _ in range(5):
            engine.step()
    assert engine.metrics().num_pages_used > 0
    assert engine.abort_request("a") and engine.abort_request("b")
    assert engine.metrics().num_pages_used == 0
    engine.check_leaks()
    assert not engine.has_unfinished_requests()


def test_n_forks_share_the_prompt_pages_and_sample_independently(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    llm = mlxserve.LLM(ckpt, **SMALL)
    prompt = PROMPTS[2]  # 37 tokens: two full pages to share
    results = llm.generate([prompt], n=3, max_tokens=8, temperature=1.0, seed=5)
    assert len(results) == 3
    assert [r.num_cached_tokens for r in results] == [0, 32, 32]
    assert len({r.token_ids for r in results}) == 3  # different seeds, different samples
    again = mlxserve.LLM(ckpt, **SMALL).generate([prompt], n=3, max_tokens=8, temperature=1.0, seed=5)
    assert [r.token_ids for r in again] == [r.token_ids for r in results]
    greedy = llm.generate([prompt], n=2, max_tokens=8)
    assert greedy[0].token_ids == greedy[1].token_ids
    llm.engine.check_leaks()


def test_kv_budget_in_gib_or_as_a_fraction_of_available_memory(tiny_ckpt, monkeypatch):
    from mlxserve.engine import core
    from mlxserve.errors import ConfigError

    model, _ = mlxserve.load(tiny_ckpt("llama"))
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x float32
    engine = EngineCore(model, EngineConfig(kv_memory_gb=100 * 16 * per_token / 2**30))
    assert engine.num_pages == 100 and engine.bytes_per_token == per_token
    assert engine.describe() == "KV cache: 0.00 GiB, 99 pages of 16 tokens (1584 tokens, 0.5 KiB per token)"
    monkeypatch.setattr(core, "available_memory_bytes", lambda: 1000 * 16 * per_token)
    assert EngineCore(model, EngineConfig(kv_memory_fraction=0.5)).num_pages == 500
    with pytest.raises(ConfigError) as e:
        EngineConfig(kv_memory_fraction=1.5).validate()
    assert e.value.param == "kv_memory_fraction"


def test_pages_behind_a_uniform_sliding_window_are_freed(tiny_ckpt):
    ckpt = tiny_ckpt("mistral")  # every layer slides over 16 positions
    model, _ = mlxserve.load(ckpt)
    engine = EngineCore(model, EngineConfig(**SMALL))
    engine.add_request(EngineRequest("a", tuple(PROMPTS[2]), SamplingParams(max_tokens=40)))
    tokens, most_pages = [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
        most_pages = max(most_pages, engine.metrics().num_pages_used)
    assert len(tokens) == 40  # 37 + 40 positions would need 5 pages of 16 without freeing
    assert most_pages <= 3  # the window (16 positions) spans at most 2 pages, plus the page being written
    assert tokens == _alone(ckpt, [PROMPTS[2]], max_tokens=40)[0]
    engine.check_leaks()
