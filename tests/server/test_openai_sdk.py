"""The official ``openai`` SDK against the server: what OpenAI clients, editors and agents will see."""

from __future__ import annotations

import openai
import pytest
from _live_server import API_KEY, MODEL_NAME

import mlxserve

MESSAGES = [{"role": "user", "content": "Write about the sea."}]


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=10) as client:
        yield client


def test_chat_matches_mlxserve_generate_with_exact_usage(sdk, server, reference):
    r = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    model, tokenizer = reference
    assert r.choices[0].message.content == mlxserve.generate(model, tokenizer, MESSAGES, max_tokens=12)
    assert (r.choices[0].finish_reason, r.choices[0].message.role) == ("length", "assistant")
    num_prompt = len(server.engine.tokenizer.encode_chat(MESSAGES))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (num_prompt, 12, num_prompt + 12)
    assert r.usage.prompt_tokens_details.cached_tokens in (0, (num_prompt - 1) // 16 * 16)


def test_chat_stream_equals_the_whole_and_reports_usage(sdk):
    whole = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(sdk.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_stream_and_not(sdk, reference):
    model, tokenizer = reference
    whole = sdk.completions.create(model=MODEL_NAME, prompt="The sea", max_tokens=10, temperature=0)
    assert whole.choices[0].text == mlxserve.generate(model, tokenizer, "The sea", max_tokens=10)
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model=MODEL_NAME, prompt="The sea", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    assert whole.usage.prompt_tokens == len(tokenizer.encode("The sea")) and whole.usage.completion_tokens == 10


def test_n_and_seed(sdk):
    def sample():
        r = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=1.0, n=2,
                                        seed=42)
        return [c.message.content for c in r.choices]

    first = sample()
    assert first == sample() and len(set(first)) == 2


def test_stop_string(sdk):
    full = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    r = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0, stop=stop)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text[: text.find(stop)], "stop")


def test_logprobs(sdk):
    r = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(t.logprob <= 0 for t in content)
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == r.choices[0].message.content


def test_models_list(sdk):
    assert [m.id for m in sdk.models.list()] == [MODEL_NAME]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"n": 0}, "n"),
     ({"messages": []}, "messages"), ({"max_tokens": "10"}, "max_tokens")],
)
def test_bad_requests_are_typed_with_their_param(sdk, kwargs, param):
    fields = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(**fields)
    assert (info.value.status_code, info.value.param, info.value.type) == (400, param, "invalid_request_error")


def test_context_length_exceeded(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "sea " * 400}])
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")


def test_unknown_model_and_bad_key(sdk, server):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as auth:
            bad.models.list()
    assert auth.value.code == "invalid_api_key"
