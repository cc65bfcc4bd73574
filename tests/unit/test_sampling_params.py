"""SamplingParams validation: every invalid field -> InvalidRequestError naming that field."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import pytest

from mlxserve.errors import InvalidRequestError
from mlxserve.sampling.params import SamplingParams

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 2**31 + 1}, "max_tokens"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 100.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -1}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": 101.0}, "repetition_penalty"),
    ({"repetition_context_size": 0}, "repetition_context_size"),
    ({"repetition_context_size": 2**21}, "repetition_context_size"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"50256": 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"),
    ({"logit_bias": {5: -101}}, "logit_bias"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"),
    ({"logit_bias": {5: "1"}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["1"]}, "stop_token_ids"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 5}, "top_logprobs"),  # needs logprobs=True
]


@pytest.mark.parametrize(("kwargs", "param"), INVALID, ids=[f"{p}={list(k.values())[0]!r}"[:60] for k, p in INVALID])
def test_invalid_field_names_its_param(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert info.value.http_status == 400
    assert f"`{param}`" in info.value.message


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (256, 0.0, 1.0, 0, 0.0)
    penalties = (p.repetition_penalty, p.repetition_context_size, p.presence_penalty, p.frequency_penalty)
    assert penalties == (1.0, 20, 0.0, 0.0)
    assert (p.logit_bias, p.seed, p.stop, p.stop_token_ids, p.logprobs, p.top_logprobs) == (None, None, (), (), False, 0)
    assert p.is_greedy


def test_boundaries_are_valid() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, min_p=0.0, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(max_tokens=2**31, temperature=100, top_p=1e-9, min_p=1, seed=2**63 - 1, top_k=10**6)
    SamplingParams(stop=["x" * 256] * 16, logit_bias={i: 100 for i in range(1024)}, logprobs=True, top_logprobs=20)


def test_normalization_makes_params_immutable_and_hashable() -> None:
    p = SamplingParams(stop=["b", "a"], stop_token_ids=[3, 1], logit_bias={7: 1, 2: -0.5})
    assert p.stop == ("b", "a")
    assert p.stop_token_ids == (3, 1)
    assert p.logit_bias == ((2, -0.5), (7, 1.0))
    assert p.logit_bias_map == {2: -0.5, 7: 1.0}
    same = SamplingParams(stop=("b", "a"), stop_token_ids=(3, 1), logit_bias=MappingProxyType({2: -0.5, 7: 1.0}))
    assert p == same and hash(p) == hash(same)
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(logit_bias={}).logit_bias is None
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


def test_validate_for_vocab() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[99]).validate_for_vocab(100)
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias={100: 1.0}).validate_for_vocab(100)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop_token_ids=[5, 100]).validate_for_vocab(100)
    assert info.value.param == "stop_token_ids"
