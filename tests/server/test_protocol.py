"""Request bodies -> SamplingParams, refusals and caps, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlxserve.errors import InvalidRequestError
from mlxserve.sampling.params import SamplingParams
from mlxserve.server.protocol import ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def test_every_sampling_field_reaches_sampling_params():
    body = chat(
        temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25,
        repetition_penalty=1.1, seed=7, stop=["a", "b"], logit_bias={"5": 2, "9": -100}, logprobs=True,
        max_completion_tokens=12, max_tokens=99,
    )
    assert body.to_sampling_params(default_max_tokens=1) == SamplingParams(
        max_tokens=12, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25,
        repetition_penalty=1.1, seed=7, stop=("a", "b"), logit_bias={5: 2.0, 9: -100.0}, logprobs=True,
    )


def test_defaults_are_openais():
    params = chat().to_sampling_params(default_max_tokens=40)
    assert params == SamplingParams(max_tokens=40, temperature=1.0)
    assert completion().to_sampling_params(default_max_tokens=40).max_tokens == 16  # /v1/completions default
    assert chat(stop="x").to_sampling_params(1).stop == ("x",)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"chat_template": "{{ ''.__class__.__mro__ }}"}, "chat_template"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
    ],
)
def test_refusals_name_their_field(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        chat(**fields).to_sampling_params(default_max_tokens=1)
    assert info.value.param == param


@pytest.mark.parametrize(
    "fields",
    [{"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"modalities": ["text"]}, {"top_logprobs": 0}],
)
def test_no_op_values_of_unsupported_fields_are_accepted(fields):
    assert chat(**fields).to_sampling_params(default_max_tokens=1).max_tokens == 1


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"n": 0}, ("n",)),
        ({"n": 17}, ("n",)),
        ({"temperature": -1}, ("temperature",)),
        ({"temperature": 2.5}, ("temperature",)),
        ({"top_p": 0}, ("top_p",)),
        ({"max_tokens": "10"}, ("max_tokens",)),
        ({"temperature": True}, ("temperature",)),
        ({"top_logprobs": 21}, ("top_logprobs",)),
        ({"messages": []}, ("messages",)),
        ({"messages": [{"role": "robot", "content": "x"}]}, ("messages", 0, "role")),
    ],
)
def test_schema_errors_point_at_the_field(fields, loc):
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    assert info.value.errors()[0]["loc"] == loc


def test_messages_become_template_messages():
    body = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "content": None},
    ])
    assert body.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb", "name": "ann"},
        {"role": "assistant", "content": ""},
    ]


def test_image_parts_and_tool_calls_are_refused():
    body = chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
    ]}])
    with pytest.raises(InvalidRequestError) as info:
        body.template_messages()
    assert info.value.param == "messages[0].content[1]"
    body = chat(messages=[{"role": "assistant", "tool_calls": [{"id": "x"}]}])
    with pytest.raises(InvalidRequestError) as info:
        body.template_messages()
    assert info.value.param == "messages[0].tool_calls"


def test_unknown_fields_are_kept_aside_for_the_log():
    assert chat(foo=1, bar="x").unknown_fields() == ["bar", "foo"]
    assert chat().unknown_fields() == []


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([5, 6], [[5, 6]]), ([[5], [6, 7]], [[5], [6, 7]])],
)
def test_the_four_prompt_shapes(prompt, expected):
    assert completion(prompt=prompt).prompts() == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ["x"] * 17}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
    ],
)
def test_completion_refusals(fields, param):
    body = completion(**fields)
    with pytest.raises(InvalidRequestError) as info:
        body.to_sampling_params(default_max_tokens=1)
        body.prompts()
    assert info.value.param == param


def test_completion_logprobs_zero_means_the_chosen_tokens():
    assert completion(logprobs=0).to_sampling_params(1).logprobs is True
    assert completion().to_sampling_params(1).logprobs is False
