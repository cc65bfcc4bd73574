"""Quantization through the converter: every bits x group size, MLX's other modes, bad settings,
mixed-precision recipes (named and JSON files) and the per-layer map written to config.json."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import save_file

from fixtures.checkpoints import VOCAB_SIZE, build_config, build_weights
from fixtures.reference import PROMPTS
from fixtures.tokenizer import build_tokenizer
from mlxserve.convert import ConvertConfig, QuantSpec, convert
from mlxserve.convert.quantize import (
    NON_DIVISIBLE_RULE,
    RECIPES,
    bits_per_weight,
    load_recipe,
    quantize_model,
)
from mlxserve.errors import ConvertError
from mlxserve.generation.steps import generate_tokens
from mlxserve.models.loader import load_model
from mlxserve.sampling.params import SamplingParams

PROMPT = PROMPTS[1]
NUM_NEW_TOKENS = 4
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)


def llama_paths(num_layers: int, *, tied: bool = False) -> list[str]:
    """Every Linear / Embedding of the fixture llama, in module order."""
    paths = ["model.embed_tokens"]
    for i in range(num_layers):
        paths += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        paths += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return paths if tied else paths + ["lm_head"]


LLAMA_PATHS = llama_paths(2)
# In the fixture llama only down_proj reads 128 inputs (intermediate); the rest read hidden = 64.
LLAMA_IN_128 = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def layer_bits(model: nn.Module) -> dict[str, int | None]:
    """path -> bits of every Linear / Embedding (None: left in full precision)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            out[path] = module.bits
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            out[path] = None
    return out


def layer_modes(model: nn.Module) -> dict[str, tuple[int, int, str]]:
    """path -> (bits, group_size, mode) of every quantized layer."""
    return {
        path: (m.bits, m.group_size, m.mode)
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def read_quantization(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    return config["quantization"]


def greedy_cached(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    steps = generate_tokens(model, prompt, SamplingParams(), cache=model.make_cache())
    return [s.token for s in itertools.islice(steps, n)]


def greedy_recomputed(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """The slow twin: a fresh full forward pass per token, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt):]


def run_convert(src: Path, out: Path, **kw):
    return convert(ConvertConfig(source=str(src), output=out, verify=kw.pop("verify", False), **kw))


@pytest.fixture(scope="session")
def llama4_ckpt(tmp_path_factory) -> Path:
    """The fixture llama grown to 4 decoder layers (layers 2, 3 copy 0, 1), for per-layer recipes."""
    folder = tmp_path_factory.mktemp("ckpt-llama-4-layers")
    config = build_config("llama")
    config["num_hidden_layers"] = 4
    weights = build_weights("llama")
    for i in (2, 3):
        prefix = f"model.layers.{i - 2}."
        weights.update({k.replace(prefix, f"model.layers.{i}."): v for k, v in weights.items() if k.startswith(prefix)})
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(folder, VOCAB_SIZE)
    return folder


# ------------------------------------------------------------------------------ bits x group size


@pytest.mark.parametrize("group_size", AFFINE_GROUPS)
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_affine_bits_and_group_sizes_load_and_generate(tiny_ckpt, tmp_path, bits, group_size):
    out = tmp_path / "out"
    report = run_convert(tiny_ckpt("llama"), out, quant=QuantSpec(bits=bits, group_size=group_size))

    quantized = LLAMA_PATHS if group_size <= 64 else LLAMA_IN_128
    skipped = [p for p in LLAMA_PATHS if p not in quantized]
    expected = {"group_size": group_size, "bits": bits, "mode": "affine", "non_divisible": NON_DIVISIBLE_RULE}
    expected.update(dict.fromkeys(skipped, False))
    assert read_quantization(out) == expected
    assert report.quantization == expected

    model = load_model(out).model
    assert layer_modes(model) == dict.fromkeys(quantized, (bits, group_size, "affine"))
    assert layer_bits(model) == dict.fromkeys(quantized, bits) | dict.fromkeys(skipped)
    tokens = greedy_cached(model, PROMPT, NUM_NEW_TOKENS)
    assert tokens == greedy_recomputed(model, PROMPT, NUM_NEW_TOKENS)
    assert all(0 <= t < VOCAB_SIZE for t in tokens)


@pytest.mark.parametrize(("mode", "bits", "group_size"), [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_float_modes_load_and_generate(tiny_ckpt, tmp_path, mode, bits, group_size):
    # MLX 0.32 quantizes and runs mxfp4 / nvfp4 / mxfp8 on the CPU too (no biases, shared exponents).
    out = tmp_path / "out"
    run_convert(tiny_ckpt("llama"), out, quant=QuantSpec(bits=bits, group_size=group_size, mode=mode))
    assert read_quantization(out) == {
        "group_size": group_size, "bits": bits, "mode": mode, "non_divisible": NON_DIVISIBLE_RULE,
    }
    model = load_model(out).model
    assert layer_modes(model) == dict.fromkeys(LLAMA_PATHS, (bits, group_size, mode))
    assert "biases" not in model.model.layers[0].self_attn.q_proj
    tokens = greedy_cached(model, PROMPT, NUM_NEW_TOKENS)
    assert tokens == greedy_recomputed(model, PROMPT, NUM_NEW_TOKENS)


@pytest.mark.parametrize(
    ("spec", "param", "message"),
    [
        (QuantSpec(bits=7), "q_bits", "--q-bits 7 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        (QuantSpec(bits=1), "q_bits", "--q-bits 1 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        (QuantSpec(bits=16), "q_bits", "--q-bits 16 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        (QuantSpec(group_size=48), "q_group_size", "--q-group-size 48 is not valid for affine; use one of 32, 64, 128"),
        (QuantSpec(mode="int4"), "q_mode", "--q-mode must be one of affine, mxfp4, nvfp4, mxfp8, not 'int4'"),
        (QuantSpec(bits=8, group_size=32, mode="mxfp4"), "q_bits", "--q-bits 8 is not valid for mxfp4; use one of 4"),
        (QuantSpec(bits=4, group_size=64, mode="mxfp4"), "q_group_size",
         "--q-group-size 64 is not valid for mxfp4; use one of 32"),
    ],
    ids=["bits7", "bits1", "bits16", "group48", "mode-int4", "mxfp4-bits8", "mxfp4-group64"],
)
def test_bad_quantization_settings_write_nothing(tiny_ckpt, tmp_path, spec, param, message):
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as info:
        run_convert(tiny_ckpt("llama"), out, quant=spec)
    assert (info.value.param, str(info.value)) == (param, message)
    assert os.listdir(tmp_path) == []


def test_settings_are_checked_before_the_source(tmp_path):
    with pytest.raises(ConvertError) as info:
        run_convert(tmp_path / "no-such-model", tmp_path / "out", quant=QuantSpec(bits=7))
    assert info.value.param == "q_bits"


def test_no_quantize_ignores_the_quant_settings(tiny_ckpt, tmp_path):
    report = run_convert(tiny_ckpt("llama"), tmp_path / "out", quantize=False, quant=QuantSpec(bits=7))
    assert report.quantization is None
    assert layer_bits(load_model(tmp_path / "out").model) == dict.fromkeys(LLAMA_PATHS)


# ---------------------------------------------------------------------------------------- recipes


def test_high_embed_keeps_embeddings_and_head_at_8_bits(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_convert(tiny_ckpt("llama"), out, recipe="high-embed")
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert read_quantization(out) == {
        "group_size": 64, "bits": 4, "mode": "affine", "non_divisible": NON_DIVISIBLE_RULE,
        "model.embed_tokens": eight, "lm_head": eight,
    }
    model = load_model(out).model
    expected = dict.fromkeys(LLAMA_PATHS, 4) | {"model.embed_tokens": 8, "lm_head": 8}
    assert layer_bits(model) == expected
    assert model.model.embed_tokens.bits == 8 and model.lm_head.bits == 8


def test_high_embed_on_a_tied_model_quantizes_the_shared_table(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_convert(tiny_ckpt("llama3"), out, recipe="high-embed")
    assert read_quantization(out)["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "lm_head" not in read_quantization(out)
    model = load_model(out).model
    assert layer_bits(model) == dict.fromkeys(llama_paths(2, tied=True), 4) | {"model.embed_tokens": 8}
    assert greedy_cached(model, PROMPT, NUM_NEW_TOKENS) == greedy_recomputed(model, PROMPT, NUM_NEW_TOKENS)


def test_high_embed_over_nvfp4_uses_a_valid_affine_group(tiny_ckpt, tmp_path):
    # nvfp4's group of 16 is not an affine group size: the 8-bit embeddings take the nearest one (32).
    out = tmp_path / "out"
    run_convert(tiny_ckpt("llama"), out, quant=QuantSpec(bits=4, group_size=16, mode="nvfp4"), recipe="high-embed")
    model = load_model(out).model
    modes = layer_modes(model)
    assert modes["model.embed_tokens"] == modes["lm_head"] == (8, 32, "affine")
    assert modes["model.layers.0.self_attn.q_proj"] == (4, 16, "nvfp4")


# mixed_3_6 on 4 layers: edge = max(1, 4 // 8) = 1, so layers 0 and 3 are "edge" layers and
# (layer - 1) % 3 == 2 picks none of 1, 2. Head and embeddings are always high.
MIXED_3_6_HIGH_4_LAYERS = {
    "model.embed_tokens",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.3.self_attn.v_proj",
    "model.layers.3.mlp.down_proj",
    "lm_head",
}


def test_mixed_3_6_per_layer_pattern(llama4_ckpt, tmp_path):
    out = tmp_path / "out"
    run_convert(llama4_ckpt, out, recipe="mixed_3_6")
    quant = read_quantization(out)
    six, three = {"group_size": 64, "bits": 6, "mode": "affine"}, {"group_size": 64, "bits": 3, "mode": "affine"}
    expected = {p: (six if p in MIXED_3_6_HIGH_4_LAYERS else three) for p in llama_paths(4)}
    assert quant == {"group_size": 64, "bits": 4, "mode": "affine", "non_divisible": NON_DIVISIBLE_RULE, **expected}
    bits = layer_bits(load_model(out).model)
    assert {p for p, b in bits.items() if b == 6} == MIXED_3_6_HIGH_4_LAYERS
    assert {p for p, b in bits.items() if b == 3} == set(llama_paths(4)) - MIXED_3_6_HIGH_4_LAYERS


@pytest.mark.parametrize(
    ("num_layers", "high_layers"),
    [(1, [0]), (2, [0, 1]), (4, [0, 3]), (8, [0, 3, 6, 7]), (16, [0, 1, 4, 7, 10, 13, 14, 15])],
)
def test_mixed_recipe_layer_choice(num_layers, high_layers):
    recipe, base = RECIPES["mixed_2_6"], QuantSpec()
    chosen = [
        i for i in range(num_layers)
        if recipe(f"model.layers.{i}.self_attn.v_proj", i, num_layers, base).bits == 6
    ]
    assert chosen == high_layers
    for i in range(num_layers):  # q/k/o/gate/up stay low on every layer, even the edges
        assert recipe(f"model.layers.{i}.self_attn.q_proj", i, num_layers, base) == QuantSpec(2, 64)
    assert recipe("lm_head", None, num_layers, base) == QuantSpec(6, 64)


def test_mixed_recipe_refuses_non_affine_modes(tiny_ckpt, tmp_path):
    with pytest.raises(ConvertError) as info:
        run_convert(tiny_ckpt("llama"), tmp_path / "out", quant=QuantSpec(4, 32, "mxfp4"), recipe="mixed_3_6")
    assert info.value.param == "quant_recipe"
    assert str(info.value) == "--quant-recipe mixed_3_6 mixes affine bit widths; use it with --q-mode affine, not mxfp4"
    assert os.listdir(tmp_path) == []


def test_json_recipe_false_keeps_layer_in_full_precision(tiny_ckpt, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({r"mlp\.down_proj$": False, r"self_attn\.v_proj$": {"bits": 8}}))
    out = tmp_path / "out"
    run_convert(tiny_ckpt("llama"), out, recipe=str(recipe))
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert read_quantization(out) == {
        "group_size": 64, "bits": 4, "mode": "affine", "non_divisible": NON_DIVISIBLE_RULE,
        "model.layers.0.self_attn.v_proj": eight, "model.layers.0.mlp.down_proj": False,
        "model.layers.1.self_attn.v_proj": eight, "model.layers.1.mlp.down_proj": False,
    }
    model = load_model(out).model
    assert layer_bits(model) == dict.fromkeys(LLAMA_PATHS, 4) | {
        "model.layers.0.self_attn.v_proj": 8, "model.layers.1.self_attn.v_proj": 8,
        "model.layers.0.mlp.down_proj": None, "model.layers.1.mlp.down_proj": None,
    }
    source = build_weights("llama")
    for i in (0, 1):
        kept = model.model.layers[i].mlp.down_proj.weight
        assert kept.dtype == mx.float32
        np.testing.assert_array_equal(np.array(kept), source[f"model.layers.{i}.mlp.down_proj.weight"])


def test_unknown_recipe_name(tiny_ckpt, tmp_path):
    with pytest.raises(ConvertError) as info:
        run_convert(tiny_ckpt("llama"), tmp_path / "out", recipe="mixed_9_9")
    assert info.value.param == "quant_recipe"
    assert str(info.value) == (
        "--quant-recipe 'mixed_9_9' is neither a recipe (uniform, high-embed, mixed_2_6, mixed_3_4, "
        "mixed_3_6, mixed_4_6, mixed_4_8) nor a JSON file"
    )
    assert os.listdir(tmp_path) == []


_BAD_RULE = (
    "--quant-recipe r.json: the value for 'q_proj' must be false or an object with integer bits / group_size "
    "and string mode, not "
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{bad json", "--quant-recipe r.json: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ('["q_proj"]', (
            "--quant-recipe r.json must hold a JSON object mapping module-path regexes to "
            "{bits, group_size, mode} or false"
        )),
        ('{"(": false}', "--quant-recipe r.json: bad regex '(' (missing ), unterminated subpattern at position 0)"),
        ('{"q_proj": {"bitz": 8}}', _BAD_RULE + '{"bitz": 8}'),
        ('{"q_proj": true}', _BAD_RULE + "true"),
        ('{"q_proj": {"bits": "8"}}', _BAD_RULE + '{"bits": "8"}'),
    ],
    ids=["not-json", "list", "bad-regex", "unknown-key", "true", "string-bits"],
)
def test_bad_recipe_files_are_refused_up_front(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(ConvertError) as info:
        load_recipe(str(tmp_path / "r.json"))
    assert (info.value.param, str(info.value)) == ("quant_recipe", message)


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"bits": 7}, "--q-bits 7 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        ({"group_size": 0}, "--q-group-size 0 is not valid for affine; use one of 32, 64, 128"),
        ({"mode": "mxfp4"}, "--q-group-size 64 is not valid for mxfp4; use one of 32"),
    ],
    ids=["bits7", "group0", "mxfp4-group64"],
)
def test_recipe_setting_mlx_cannot_use_names_the_layer(tiny_ckpt, tmp_path, setting, reason):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({r"layers\.1\.self_attn\.q_proj": setting}))
    with pytest.raises(ConvertError) as info:
        run_convert(tiny_ckpt("llama"), tmp_path / "out", recipe=str(recipe))
    spec = {"group_size": 64, "bits": 4, "mode": "affine", **setting}
    assert info.value.param == "quant_recipe"
    assert str(info.value) == f"--quant-recipe sets model.layers.1.self_attn.q_proj to {spec}, which cannot be used: {reason}"
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


# ------------------------------------------------------------------------------- quantize_model


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.layers = [nn.Linear(64, 32), nn.Linear(48, 32)]
        self.norm = nn.RMSNorm(32)
        self.head = nn.Linear(32, 8)


def test_quantize_model_records_every_non_divisible_layer():
    model = _Toy()
    block = quantize_model(model, QuantSpec(bits=4, group_size=64))
    assert block == {
        "group_size": 64, "bits": 4, "mode": "affine", "non_divisible": NON_DIVISIBLE_RULE,
        "layers.1": False, "head": False,
    }
    assert layer_bits(model) == {"embed": 4, "head": None, "layers.0": 4, "layers.1": None}


def test_bits_per_weight():
    assert bits_per_weight(num_bytes=1000, num_parameters=2000) == 4.0
    assert bits_per_weight(num_bytes=10, num_parameters=0) == 80.0  # no division by zero
