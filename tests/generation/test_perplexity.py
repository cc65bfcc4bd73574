"""Perplexity: exact on a model that knows nothing, equal to a direct computation, dequantization exact."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from fixtures.reference import PROMPTS, hf_logits
from mlx.utils import tree_flatten, tree_map

import mlxserve
from mlxserve.errors import InvalidRequestError
from mlxserve.evaluate import dequantize_model, perplexity, read_eval_tokens
from mlxserve.models.loader import load_model


def test_a_model_with_zero_weights_has_perplexity_equal_to_the_vocab_size(tiny_ckpt):
    model = load_model(tiny_ckpt("llama")).model
    model.update(tree_map(mx.zeros_like, model.parameters()))  # logits all 0: uniform prediction
    result = perplexity(model, list(range(5, 105)), context=32)
    assert result.num_tokens == 99 - 3  # windows of 32: 31 + 31 + 31 + 3 predicted tokens
    assert result.num_windows == 4
    assert result.perplexity == pytest.approx(512, rel=1e-5)


def test_perplexity_equals_transformers_cross_entropy(tiny_ckpt):
    ckpt = tiny_ckpt("qwen2")
    model = load_model(ckpt).model
    tokens = PROMPTS[2]
    logits = hf_logits(ckpt, tokens)[:-1].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.mean(log_probs[np.arange(len(tokens) - 1), tokens[1:]])
    result = perplexity(model, tokens, context=len(tokens))
    assert result.mean_nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_dequantized_layers_hold_exactly_the_quantized_values(tiny_ckpt):
    model = load_model(tiny_ckpt("llama")).model
    nn.quantize(model, group_size=32, bits=4)
    ids = mx.array([PROMPTS[1]])
    quantized_logits = model(ids)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = mx.dequantize(q_proj.weight, q_proj.scales, q_proj.biases, group_size=32, bits=4)
    dequantize_model(model)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert mx.array_equal(model.model.layers[0].self_attn.q_proj.weight, expected).item()
    np.testing.assert_allclose(np.array(model(ids)), np.array(quantized_logits), atol=1e-4)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))


def test_jsonl_and_bad_data(tiny_ckpt, tmp_path):
    _, tokenizer = mlxserve.load(tiny_ckpt("llama"))
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    eos = min(tokenizer.eos_token_ids)
    expected = tokenizer.encode("hello world", add_special_tokens=False) + [eos]
    expected += tokenizer.encode("again", add_special_tokens=False) + [eos]
    assert read_eval_tokens(good, tokenizer) == expected
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "no"}) + "\n")
    with pytest.raises(InvalidRequestError) as e:
        read_eval_tokens(bad, tokenizer)
    assert str(e.value) == 'bad.jsonl:2: expected a JSON object with a "text" string'
    with pytest.raises(InvalidRequestError) as e:
        read_eval_tokens(tmp_path / "missing.txt", tokenizer)
    assert str(e.value) == "data file 'missing.txt' does not exist"
