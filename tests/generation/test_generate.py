"""The generation loop and Python API: pipelined decoding, stop conditions, seeds, prompt caching."""

from __future__ import annotations

import mlx.core as mx
import pytest
from fixtures.reference import PROMPTS, hf_greedy

import mlxserve
from mlxserve.chat_session import ChatSession
from mlxserve.errors import InvalidRequestError
from mlxserve.generation.prompt_cache import PromptCache


@pytest.fixture(scope="module")
def llama(tiny_ckpt):
    return mlxserve.load(tiny_ckpt("llama"))


@pytest.fixture(scope="module")
def llama_path(tiny_ckpt):
    return tiny_ckpt("llama")


def _tokens(model, tokenizer, prompt, **kw):
    return [r.token for r in mlxserve.stream_generate(model, tokenizer, prompt, **kw)]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_pipelined_greedy_equals_transformers(tiny_ckpt, arch):
    ckpt = tiny_ckpt(arch)
    model, tokenizer = mlxserve.load(ckpt)
    prompt = PROMPTS[1]
    ours = _tokens(model, tokenizer, prompt, max_tokens=16, stop_token_ids=(), temperature=0.0)
    # EOS may legitimately end ours early; compare the common length.
    assert ours == hf_greedy(ckpt, prompt, 16)[: len(ours)]


def test_prompt_forms_agree(llama):
    model, tokenizer = llama
    text = "The quick brown fox"
    ids = tokenizer.encode(text)
    assert _tokens(model, tokenizer, text, max_tokens=8) == _tokens(model, tokenizer, ids, max_tokens=8)
    messages = [{"role": "user", "content": text}]
    chat_ids = tokenizer.encode_chat(messages)
    assert _tokens(model, tokenizer, messages, max_tokens=8) == _tokens(model, tokenizer, chat_ids, max_tokens=8)


def test_max_tokens_and_final_response(llama):
    model, tokenizer = llama
    responses = list(mlxserve.stream_generate(model, tokenizer, PROMPTS[2], max_tokens=7))
    finish = [r.finish_reason for r in responses]
    if finish[-1] == "length":
        assert len(responses) == 7
    assert finish[:-1] == [None] * (len(responses) - 1)
    last = responses[-1]
    assert last.prompt_tokens == len(PROMPTS[2]) and last.generation_tokens == len(responses)
    assert last.prompt_tps > 0 and last.peak_memory_gb >= 0
    # logprob is the log-probability of the sampled token in the reported distribution
    for r in responses:
        assert r.logprob == pytest.approx(r.logprobs[r.token].item())
        assert r.logprob <= 0.0


def test_text_equals_decode_of_tokens(llama):
    model, tokenizer = llama
    responses = list(mlxserve.stream_generate(model, tokenizer, PROMPTS[1], max_tokens=24))
    tokens = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_token_id_ends_generation(llama):
    model, tokenizer = llama
    free = _tokens(model, tokenizer, PROMPTS[0], max_tokens=10)
    stop_at = free[4]
    first = free.index(stop_at)
    stopped = list(mlxserve.stream_generate(model, tokenizer, PROMPTS[0], max_tokens=10, stop_token_ids=(stop_at,)))
    assert [r.token for r in stopped] == free[: first + 1]
    assert stopped[-1].finish_reason == "stop"


def test_stop_string_is_cut_and_never_emitted(llama):
    model, tokenizer = llama
    full = mlxserve.generate(model, tokenizer, PROMPTS[0], max_tokens=30)
    assert len(full) > 12, full
    stop = full[5:9]  # from the middle of the text, so it is matched across several tokens
    text = mlxserve.generate(model, tokenizer, PROMPTS[0], max_tokens=30, stop=(stop,))
    assert text == full[: full.index(stop)]


def test_same_seed_same_output_different_seed_differs(llama):
    model, tokenizer = llama
    kw = dict(max_tokens=20, temperature=1.0, stop_token_ids=())
    a = _tokens(model, tokenizer, PROMPTS[0], seed=7, **kw)
    mx.random.seed(123)  # global RNG state must not matter
    b = _tokens(model, tokenizer, PROMPTS[0], seed=7, **kw)
    c = _tokens(model, tokenizer, PROMPTS[0], seed=8, **kw)
    assert a == b
    assert a != c


def test_bad_prompts_are_clear_errors(llama):
    model, tokenizer = llama
    with pytest.raises(InvalidRequestError) as e:
        mlxserve.generate(model, tokenizer, [], max_tokens=3)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        mlxserve.generate(model, tokenizer, [1, 10**6], max_tokens=3)
    assert str(e.value) == "prompt token id 1000000 is outside the vocabulary"
    with pytest.raises(InvalidRequestError) as e:
        mlxserve.generate(model, tokenizer, "hi", max_tokens=0)
    assert e.value.param == "max_tokens"


def test_prompt_cache_reuses_prefix_and_matches_fresh(llama):
    model, tokenizer = llama
    cache = PromptCache(model)
    first = _tokens(model, tokenizer, PROMPTS[2], max_tokens=5, prompt_cache=cache, stop_token_ids=())
    assert cache.token_ids == PROMPTS[2] + first
    follow_up = PROMPTS[2] + first + PROMPTS[0]
    history, new = cache.prepare(follow_up)
    assert history == PROMPTS[2] + first and new == PROMPTS[0]
    cache.token_ids = PROMPTS[2] + first  # undo prepare's bookkeeping; the KV is unchanged
    cached = _tokens(model, tokenizer, follow_up, max_tokens=6, prompt_cache=cache, stop_token_ids=())
    fresh = _tokens(model, tokenizer, follow_up, max_tokens=6, stop_token_ids=())
    assert cached == fresh
    # A prompt that diverges earlier trims the cache back to the shared prefix.
    diverged = PROMPTS[2][:10] + PROMPTS[1]
    assert _tokens(model, tokenizer, diverged, max_tokens=6, prompt_cache=cache, stop_token_ids=()) == _tokens(
        model, tokenizer, diverged, max_tokens=6, stop_token_ids=()
    )


def test_chat_session_keeps_cache_between_turns(llama):
    model, tokenizer = llama
    session = ChatSession(model, tokenizer, system="Be brief.", sampling=dict(max_tokens=6))
    out = []
    session.reply("Hello there", out.append)
    cached_after_first = session.cache.num_tokens
    second = session.reply("And then?", out.append)
    fresh = mlxserve.generate(model, tokenizer, session.messages[:-1], max_tokens=6)
    assert second == fresh
    assert cached_after_first > 0
    assert session.cache.num_tokens > cached_after_first


def test_max_kv_size_through_the_api(llama):
    model, tokenizer = llama
    tokens = _tokens(model, tokenizer, PROMPTS[2], max_tokens=20, max_kv_size=16, stop_token_ids=())
    assert len(tokens) == 20
