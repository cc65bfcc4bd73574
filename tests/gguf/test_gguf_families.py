"""Tiny GGUFs of every supported family convert back to the model they were made from.

The GGUFs are written from the tiny HF fixture checkpoints the way llama.cpp would (see
_gguf_builder.py). Logits are compared with mlxserve's own loader on the source checkpoint (F32
GGUF) or on a checkpoint holding the GGUF's dequantized values (quantized GGUF).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from _gguf_builder import build_gguf, write_reference_checkpoint
from gguf import GGMLQuantizationType as T
from mlxserve.convert.gguf import convert_gguf, read_gguf
from mlxserve.convert.quantize import QuantSpec, quantize_model

from mlxserve.errors import ConvertError, CorruptCheckpointError, UnsupportedModelError
from mlxserve.models.loader import load_model

# fixture arch -> GGUF architecture llama.cpp writes (Mistral is "llama" there)
GGUF_ARCH = {
    "llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
}
EXPECTED_MODEL_TYPE = {**{a: a for a in GGUF_ARCH}, "llama3": "llama", "mistral": "llama"}
# 12 tokens: longer than gemma2's window (8), shorter than mistral's (16), which a GGUF cannot carry.
TOKEN_IDS = [[5, 17, 200, 301, 42, 7, 99, 311, 12, 400, 3, 60]]
# Config keys a GGUF carries that must come back exactly.
CONFIG_KEYS = (
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "tie_word_embeddings", "sliding_window", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping",
)


def logits(folder: Path) -> np.ndarray:
    return np.array(load_model(folder).model(mx.array(TOKEN_IDS)))


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_f32_gguf_gives_back_the_source_model_exactly(tiny_ckpt, tmp_path, arch):
    ckpt = tiny_ckpt(arch)
    built = build_gguf(ckpt, tmp_path / "m.gguf", GGUF_ARCH[arch])
    result = convert_gguf(built.path, tmp_path / "out", quantize=False, dtype="float32")
    assert result.model_type == EXPECTED_MODEL_TYPE[arch]
    assert (result.lossless_tensors, result.requantized_tensors, result.quantization) == (0, 0, None)
    source = json.loads((ckpt / "config.json").read_text())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in CONFIG_KEYS:
        # llama.cpp keeps sliding windows only where they are used (Gemma); Qwen2's is switched off
        if source.get(key) is not None and (key != "sliding_window" or arch.startswith("gemma")):
            assert config[key] == pytest.approx(source[key]), key
    assert config["rope_theta"] == pytest.approx(source["rope_theta"])
    expected = logits(ckpt)
    got = logits(tmp_path / "out")
    if arch.startswith("gemma"):  # norms went through (w + 1) - 1 in float32: last-bit changes
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    else:
        assert np.array_equal(got, expected)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("llama3"), tmp_path / "m.gguf", "llama")
    convert_gguf(built.path, tmp_path / "out", quantize=False, dtype="float32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def test_gemma3_layer_types_and_local_rope(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("gemma3_text"), tmp_path / "m.gguf", "gemma3")
    convert_gguf(built.path, tmp_path / "out", quantize=False, dtype="float32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert config["rope_local_base_freq"] == 5000.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert config["query_pre_attn_scalar"] == 24.0


def lossless_types(name: str) -> int:
    """A different lossless block format per projection, Q8_0 embeddings as llama.cpp writes them."""
    for part, qtype in (("q_proj", T.Q8_0), ("k_proj", T.Q4_0), ("qkv_proj", T.Q4_0), ("embed", T.Q8_0),
                        ("lm_head", T.Q8_0), ("o_proj", T.Q4_1), ("gate", T.Q4_0), ("up_proj", T.Q4_1)):
        if part in name:
            return qtype
    return T.Q4_1


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_lossless_blocks_keep_the_gguf_weights(tiny_ckpt, tmp_path, arch):
    ckpt = tiny_ckpt(arch)
    built = build_gguf(ckpt, tmp_path / "m.gguf", GGUF_ARCH[arch], types=lossless_types)
    result = convert_gguf(built.path, tmp_path / "out", quantize=True, bits=4, group_size=32, dtype="float32")
    matrices = [n for n, w in built.weights.items() if w.ndim == 2]
    assert result.lossless_tensors == len(matrices) and result.requantized_tensors == 0
    eight_bit = {n.removesuffix(".weight") for n in matrices if built.types[n] == T.Q8_0}
    overrides = {k: v for k, v in result.quantization.items() if isinstance(v, dict)}
    assert overrides == {m: {"bits": 8, "group_size": 32, "mode": "affine"} for m in eight_bit}
    reference = write_reference_checkpoint(ckpt, built.weights, tmp_path / "ref")
    # Same weights; quantized vs dense matmuls differ only in float32 rounding (measured <= 3e-5).
    np.testing.assert_allclose(logits(tmp_path / "out"), logits(reference), rtol=0, atol=2e-4)
    dense = convert_gguf(built.path, tmp_path / "dense", quantize=False, dtype="float32")
    assert dense.lossless_tensors == 0
    assert np.array_equal(logits(tmp_path / "dense"), logits(reference))


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q5_0, T.Q5_1])
def test_other_types_are_dequantized_then_requantized(tiny_ckpt, tmp_path, qtype):
    """llama (permuted q/k) stored as another type -> the same model mx.quantize makes of its values."""
    ckpt = tiny_ckpt("llama")
    built = build_gguf(ckpt, tmp_path / "m.gguf", "llama", types=lambda name: qtype)
    result = convert_gguf(built.path, tmp_path / "out", quantize=True, bits=4, group_size=64, dtype="float32")
    assert (result.lossless_tensors, result.requantized_tensors) == (0, 2 + 7 * 2)
    assert result.quantization == {"group_size": 64, "bits": 4, "mode": "affine", "non_divisible": "keep-full-precision"}
    reference = load_model(write_reference_checkpoint(ckpt, built.weights, tmp_path / "ref"))
    quantize_model(reference.model, QuantSpec(bits=4, group_size=64))
    expected = np.array(reference.model(mx.array(TOKEN_IDS)))
    assert np.array_equal(logits(tmp_path / "out"), expected)


def test_float16_output_stores_float16_scales(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("qwen2"), tmp_path / "m.gguf", "qwen2", types=lossless_types)
    result = convert_gguf(built.path, tmp_path / "out", group_size=32)  # default dtype float16
    loaded = load_model(tmp_path / "out")
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert (q.scales.dtype, q.biases.dtype, q.bits, q.group_size) == (mx.float16, mx.float16, 8, 32)
    assert loaded.model.model.norm.weight.dtype == mx.float16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert result.lossless_tensors == 1 + 2 * 7


def test_unknown_architecture_lists_the_supported_ones(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("llama"), tmp_path / "m.gguf", "falcon")
    with pytest.raises(UnsupportedModelError) as info:
        convert_gguf(built.path, tmp_path / "out")
    assert str(info.value) == (
        "m.gguf: GGUF architecture 'falcon' is not supported; "
        "supported GGUF architectures: gemma2, gemma3, llama, phi3, qwen2, qwen3"
    )
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_is_refused(tiny_ckpt, tmp_path):
    extra = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 32), dtype=np.float32)}
    built = build_gguf(tiny_ckpt("llama"), tmp_path / "m.gguf", "llama", extra_tensors=extra)
    with pytest.raises(UnsupportedModelError, match="tensor 'blk.0.ffn_gate_exps.weight' has no counterpart in a llama model"):
        convert_gguf(built.path, tmp_path / "out")


def test_existing_output_is_refused_then_replaced_with_overwrite(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("qwen3"), tmp_path / "m.gguf", "qwen3")
    convert_gguf(built.path, tmp_path / "out", quantize=False, dtype="float32")
    with pytest.raises(ConvertError, match="already exists; pass --overwrite"):
        convert_gguf(built.path, tmp_path / "out")
    result = convert_gguf(built.path, tmp_path / "out", overwrite=True, group_size=32, dtype="float32")
    assert result.requantized_tensors == 1 + 7 * 2


def test_bad_settings_are_refused_before_reading(tmp_path):
    with pytest.raises(ConvertError, match="--dtype must be one of float16, bfloat16, float32"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", dtype="float64")
    with pytest.raises(ConvertError, match="--q-bits 7 is not valid"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", bits=7)


def test_gemma_without_attention_scale_uses_llama_cpp_rule(tiny_ckpt, tmp_path):
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim) unless the model is a 27B."""
    built = build_gguf(tiny_ckpt("gemma2"), tmp_path / "m.gguf", "gemma2", omit_metadata=("gemma2.attention.scale",))
    convert_gguf(built.path, tmp_path / "out", quantize=False, dtype="float32")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["query_pre_attn_scalar"] == 32


def test_progress_reports_every_byte(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("phi3"), tmp_path / "m.gguf", "phi3", types=lossless_types)
    seen: dict[str, list[int]] = {}

    def progress(total: int, label: str):
        seen[label] = [total, 0]

        def update(n: int) -> None:
            seen[label][1] += n

        return update

    result = convert_gguf(built.path, tmp_path / "out", group_size=32, dtype="float32", progress=progress)
    gguf_bytes = sum(t.nbytes for t in read_gguf(built.path).tensors.values())
    assert seen["converting"] == [gguf_bytes, gguf_bytes]
    total, done = seen["writing"]
    assert done >= total > 0 and done == result.output_bytes


def test_metadata_that_contradicts_the_tensors_is_corrupt(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("qwen3"), tmp_path / "m.gguf", "qwen3", extra_metadata={"qwen3.feed_forward_length": 96})
    with pytest.raises(CorruptCheckpointError) as info:
        convert_gguf(built.path, tmp_path / "out", quantize=False)
    assert str(info.value) == (
        "m.gguf: tensors do not match the qwen3 model its metadata describes: "
        "model.layers.0.mlp.down_proj.weight is (64, 128), expected (64, 96); "
        "model.layers.0.mlp.gate_proj.weight is (128, 64), expected (96, 64); "
        "model.layers.0.mlp.up_proj.weight is (128, 64), expected (96, 64) (+3 more)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("qwen3.attention.head_count", 0, "metadata qwen3.attention.head_count must be a positive integer, not '0'"),
    ("qwen3.embedding_length", "wide", "metadata qwen3.embedding_length must be a positive integer, not 'wide'"),
    ("qwen3.rope.freq_base", "fast", "metadata qwen3.rope.freq_base must be a number, not 'fast'"),
])
def test_bad_metadata_values_are_corrupt(tiny_ckpt, tmp_path, key, value, message):
    built = build_gguf(tiny_ckpt("qwen3"), tmp_path / "m.gguf", "qwen3", extra_metadata={key: value})
    with pytest.raises(CorruptCheckpointError, match=f"^m.gguf: {message}$"):
        convert_gguf(built.path, tmp_path / "out", quantize=False)
