"""convert(ConvertConfig) end to end on tiny checkpoints: output layout, which layers get quantized,
logits against the source, the verify report, dtype casts, failures that write nothing, peak memory.

Logit tolerances (measured on the fixture models over fixtures.reference.PROMPTS, every arch, MLX 0.32
CPU): the fixtures' logits have a std of 3-4, and their high projection gains make them sensitive.

    bits  max|d| measured  mean|d| measured  mean KL measured  -> bound max / mean / KL
    8     0.43 - 1.18      0.067 - 0.099     0.0030 - 0.0080      1.5 / 0.15 / 0.012
    4     8.3  - 14.5      1.15  - 1.51      0.85   - 1.66        20  / 2.0  / 2.5
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from fixtures.checkpoints import ARCHS, build_config, build_weights
from fixtures.reference import PROMPTS
from mlxserve.convert import ConvertConfig, ConvertReport, QuantSpec, convert
from mlxserve.convert import save as save_module
from mlxserve.convert.quantize import NON_DIVISIBLE_RULE
from mlxserve.convert.save import MANIFEST_NAME, verify_model_dir
from mlxserve.convert.verify import compare, verify_prompts
from mlxserve.errors import ConvertError
from mlxserve.models.loader import load_model
from mlxserve.tokenizer.wrapper import Tokenizer

TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")
LOGIT_BOUNDS = {8: {"max": 1.5, "mean": 0.15, "kl": 0.012}, 4: {"max": 20.0, "mean": 2.0, "kl": 2.5}}
VERIFY_POSITIONS = 81  # the 4 fixed verify texts through the fixture tokenizer: 11 + 23 + 31 + 16 tokens


def run_convert(src: Path, out: Path, **kw) -> ConvertReport:
    kw.setdefault("verify", False)
    return convert(ConvertConfig(source=str(src), output=out, **kw))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def leftovers(folder: Path) -> list[str]:
    """Staging / backup folders a conversion into ``folder`` may have left."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """path -> every Linear / Embedding, quantized or not."""
    kinds = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    return {p: m for p, m in model.named_modules() if isinstance(m, kinds)}


def logits_of(model: nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    return [np.array(model(mx.array([p]))[0].astype(mx.float32)) for p in prompts]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_stats(ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
    kls = [(np.exp(log_softmax(a)) * (log_softmax(a) - log_softmax(b))).sum(-1) for a, b in zip(ref, out)]
    return {
        "max": max(float(np.abs(a - b).max()) for a, b in zip(ref, out)),
        "mean": float(np.mean([np.abs(a - b).mean() for a, b in zip(ref, out)])),
        "kl": float(np.concatenate(kls).mean()),
    }


# ----------------------------------------------------------------------------------------- layout


def test_default_conversion_layout(tiny_ckpt, tmp_path):
    src, out = tiny_ckpt("llama"), tmp_path / "out"
    report = run_convert(src, out)

    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["config.json", MANIFEST_NAME, "model.safetensors", "model.safetensors.index.json",
                            *TOKENIZER_FILES])
    config = read_json(out / "config.json")
    block = {"group_size": 64, "bits": 4, "mode": "affine", "non_divisible": NON_DIVISIBLE_RULE}
    assert config["quantization"] == config["quantization_config"] == block
    rest = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    assert rest == read_json(src / "config.json")
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    tensors = mx.load(str(out / "model.safetensors"))
    index = read_json(out / "model.safetensors.index.json")
    assert index == {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict.fromkeys(sorted(tensors), "model.safetensors"),
    }
    linear_paths = list(linear_layers(load_model(src).model))
    expected_names = {f"{p}.{part}" for p in linear_paths for part in ("weight", "scales", "biases")}
    expected_names |= {n for n in build_weights("llama") if n.endswith("norm.weight")}
    assert set(tensors) == expected_names
    assert tensors["lm_head.weight"].dtype == mx.uint32 and tensors["lm_head.scales"].dtype == mx.float32
    verify_model_dir(out, check_hashes=True)
    assert set(read_json(out / MANIFEST_NAME)["files"]) == set(files) - {MANIFEST_NAME}

    num_parameters = sum(w.size for w in build_weights("llama").values())
    sizes = sum((out / f).stat().st_size for f in files if f != MANIFEST_NAME)
    assert (report.output, report.model_type, report.num_parameters) == (out, "llama", num_parameters)
    assert report.output_bytes == sizes
    assert report.bits_per_weight == 8 * index["metadata"]["total_size"] / num_parameters
    assert report.quantization == block and report.verify is None and report.seconds > 0


def test_chat_template_is_copied(tiny_ckpt, tmp_path):
    src, out = tiny_ckpt("qwen2"), tmp_path / "out"
    run_convert(src, out)
    ours, theirs = Tokenizer.from_pretrained(out), Tokenizer.from_pretrained(src)
    assert ours.has_chat_template
    assert ours.chat_template == theirs.chat_template == read_json(src / "tokenizer_config.json")["chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert ours.encode_chat(messages, add_generation_prompt=True) == theirs.encode_chat(
        messages, add_generation_prompt=True
    )


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_divisible_layer_is_quantized(tiny_ckpt, tmp_path, arch, group_size):
    """Layers whose input size divides the group are quantized; the rest are recorded false and
    kept bit for bit. (hidden 64 divides 64 but not 128; intermediate and some q widths are 128.)"""
    src, out = tiny_ckpt(arch), tmp_path / "out"
    run_convert(src, out, quant=QuantSpec(bits=4, group_size=group_size))
    source_layers = linear_layers(load_model(src).model)
    divisible = {p for p, m in source_layers.items() if m.weight.shape[-1] % group_size == 0}
    skipped = set(source_layers) - divisible
    assert divisible  # every arch has down_proj with 128 inputs
    if group_size == 128:
        assert "model.embed_tokens" in skipped
    quant = read_json(out / "config.json")["quantization"]
    assert {k for k, v in quant.items() if v is False} == skipped
    assert set(quant) == {"group_size", "bits", "mode", "non_divisible"} | skipped

    layers = linear_layers(load_model(out).model)
    assert set(layers) == set(source_layers)
    for path, layer in layers.items():
        if path in divisible:
            assert isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)), path
            assert (layer.bits, layer.group_size, layer.mode) == (4, group_size, "affine"), path
        else:
            assert type(layer) is type(source_layers[path]), path
            assert mx.array_equal(layer.weight, source_layers[path].weight).item(), path


def test_sharded_source_and_output(tiny_ckpt, tmp_path):
    src, out = tiny_ckpt("qwen2", shards=2), tmp_path / "out"
    report = run_convert(src, out, max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    index = read_json(out / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == shards
    single = tmp_path / "single"
    run_convert(tiny_ckpt("qwen2"), single)
    a, b = logits_of(load_model(out).model, PROMPTS), logits_of(load_model(single).model, PROMPTS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert report.output_bytes == sum(
        (out / f).stat().st_size for f in os.listdir(out) if f != MANIFEST_NAME
    )


def test_progress_reports_every_byte_written(tiny_ckpt, tmp_path):
    calls, increments = [], []

    def factory(total: int, label: str):
        calls.append((total, label))
        return increments.append

    report = convert(ConvertConfig(source=str(tiny_ckpt("llama")), output=tmp_path / "out", verify=False), factory)
    weight_bytes = read_json(tmp_path / "out" / "model.safetensors.index.json")["metadata"]["total_size"]
    assert calls == [(weight_bytes, "writing")]
    assert sum(increments) == report.output_bytes


# ------------------------------------------------------------------------------ numbers vs source


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_close_to_source(tiny_ckpt, tmp_path, arch):
    src = tiny_ckpt(arch)
    ref = logits_of(load_model(src).model, PROMPTS)
    stats = {}
    for bits in (8, 4):
        run_convert(src, tmp_path / f"q{bits}", quant=QuantSpec(bits=bits))
        stats[bits] = logit_stats(ref, logits_of(load_model(tmp_path / f"q{bits}").model, PROMPTS))
        for key, bound in LOGIT_BOUNDS[bits].items():
            assert stats[bits][key] <= bound, (bits, key, stats[bits])
    assert all(stats[8][k] < stats[4][k] / 4 for k in ("max", "mean", "kl")), stats


def test_verify_report(tiny_ckpt, tmp_path):
    src = tiny_ckpt("llama")
    reports = {bits: run_convert(src, tmp_path / f"q{bits}", quant=QuantSpec(bits=bits), verify=True).verify
               for bits in (8, 4)}
    for bits, v in reports.items():
        assert all(math.isfinite(x) for x in (v.max_abs_diff, v.mean_kl, v.top1_agreement)), v
        assert v.num_positions == VERIFY_POSITIONS
        assert 0.0 < v.top1_agreement < 1.0 and v.mean_kl > 0.0
        # The report is what an independent comparison on the same prompts finds.
        prompts = verify_prompts(tmp_path / f"q{bits}", 512)
        assert [len(p) for p in prompts] == [11, 23, 31, 16]
        ref = logits_of(load_model(src).model, prompts)
        stats = logit_stats(ref, logits_of(load_model(tmp_path / f"q{bits}").model, prompts))
        assert v.max_abs_diff == pytest.approx(stats["max"], rel=1e-5)
        assert v.mean_kl == pytest.approx(stats["kl"], rel=1e-5)
    assert reports[8].max_abs_diff < reports[4].max_abs_diff
    assert reports[8].mean_kl < reports[4].mean_kl
    assert reports[8].top1_agreement > reports[4].top1_agreement


def test_verify_of_an_exact_copy_is_zero(tiny_ckpt, tmp_path):
    report = run_convert(tiny_ckpt("gemma2"), tmp_path / "out", quantize=False, verify=True)
    assert (report.verify.max_abs_diff, report.verify.mean_kl, report.verify.top1_agreement) == (0.0, 0.0, 1.0)
    again = compare(tiny_ckpt("gemma2"), tmp_path / "out")
    assert again == report.verify


# ------------------------------------------------------------------------------ full precision


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_no_quantize_casts_to_dtype(tiny_ckpt, tmp_path, dtype):
    src, out = tiny_ckpt("gemma3_text", style="v5"), tmp_path / "out"  # v5 configs say "dtype"
    report = run_convert(src, out, quantize=False, dtype=dtype)
    assert report.quantization is None
    config = read_json(out / "config.json")
    assert config["torch_dtype"] == dtype
    assert {"dtype", "quantization", "quantization_config"}.isdisjoint(config)
    assert report.bits_per_weight == 16.0

    model = load_model(out).model
    params = dict(tree_flatten(model.parameters()))
    assert {p.dtype for p in params.values()} == {getattr(mx, dtype)}
    assert all(isinstance(m, (nn.Linear, nn.Embedding)) for m in linear_layers(model).values())
    source = build_weights("gemma3_text")
    target = getattr(mx, dtype)
    for name, value in source.items():
        assert mx.array_equal(params[name], mx.array(value).astype(target)).item(), name


def test_no_quantize_keeps_source_dtype_exactly(tiny_ckpt, tmp_path):
    src, out = tiny_ckpt("phi3"), tmp_path / "out"
    report = run_convert(src, out, quantize=False)
    assert report.bits_per_weight == 32.0
    assert read_json(out / "config.json") == read_json(src / "config.json")
    a, b = logits_of(load_model(src).model, PROMPTS), logits_of(load_model(out).model, PROMPTS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# -------------------------------------------------------------------------------------- failures


def test_existing_output_is_refused_and_untouched(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError) as info:
        run_convert(tiny_ckpt("llama"), out)
    assert info.value.param == "output"
    assert str(info.value) == f"output '{out}' already exists; pass --overwrite to replace it"
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_previous_conversion(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run_convert(tiny_ckpt("llama"), out, quant=QuantSpec(bits=8))
    run_convert(tiny_ckpt("llama"), out, overwrite=True)
    assert read_json(out / "config.json")["quantization"]["bits"] == 4
    verify_model_dir(out, check_hashes=True)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_failure_mid_save_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch, overwrite):
    out = tmp_path / "out"
    if overwrite:
        run_convert(tiny_ckpt("llama"), out, quant=QuantSpec(bits=8))
    real_write = save_module.write_safetensors
    calls = []

    def failing_write(path, *args, **kw):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real_write(path, *args, **kw)

    monkeypatch.setattr(save_module, "write_safetensors", failing_write)
    with pytest.raises(ConvertError) as info:
        run_convert(tiny_ckpt("llama"), out, overwrite=overwrite, max_shard_bytes=20_000)
    assert str(info.value) == (
        "could not write 'out' (Input/output error); the partial output was removed and nothing was replaced"
    )
    assert calls[-1] == "model-00003-of-00006.safetensors"
    assert leftovers(tmp_path) == []
    if overwrite:  # the previous 8-bit conversion is intact
        verify_model_dir(out, check_hashes=True)
        assert read_json(out / "config.json")["quantization"]["bits"] == 8
    else:
        assert not out.exists()


def test_already_quantized_source_is_refused(tiny_ckpt, tmp_path):
    first = tmp_path / "q8"
    run_convert(tiny_ckpt("llama"), first, quant=QuantSpec(bits=8))
    with pytest.raises(ConvertError) as info:
        run_convert(first, tmp_path / "again")
    assert info.value.param == "source"
    assert str(info.value) == (
        "'q8' is already quantized (8-bit, group 64); convert from the full-precision checkpoint, "
        "or pass --no-quantize to copy it as it is"
    )
    assert sorted(os.listdir(tmp_path)) == ["q8"]
    # --no-quantize copies it: same layers, same logits.
    run_convert(first, tmp_path / "copy", quantize=False)
    a, b = load_model(first).model, load_model(tmp_path / "copy").model
    assert {p: m.bits for p, m in linear_layers(b).items()} == {p: m.bits for p, m in linear_layers(a).items()}
    assert all(np.array_equal(x, y) for x, y in zip(logits_of(a, PROMPTS), logits_of(b, PROMPTS)))


# ----------------------------------------------------------------------------------- peak memory

_BIG_HIDDEN, _BIG_INTERMEDIATE, _BIG_VOCAB = 1024, 4096, 4096


def _write_big_checkpoint(folder: Path) -> int:
    """A 1-layer tied llama whose embedding and three MLP matrices are 16 MiB each (float32);
    returns the tensor bytes. Written tensor by tensor so the test itself stays small."""
    h, i, v = _BIG_HIDDEN, _BIG_INTERMEDIATE, _BIG_VOCAB
    config = build_config("llama3")
    config.update(hidden_size=h, intermediate_size=i, vocab_size=v, num_hidden_layers=1,
                  num_attention_heads=16, num_key_value_heads=16)
    config.pop("head_dim", None)
    shapes = {
        "model.embed_tokens.weight": (v, h),
        **{f"model.layers.0.self_attn.{p}.weight": (h, h) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "model.layers.0.mlp.gate_proj.weight": (i, h),
        "model.layers.0.mlp.up_proj.weight": (i, h),
        "model.layers.0.mlp.down_proj.weight": (h, i),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.layers.0.post_attention_layernorm.weight": (h,),
        "model.norm.weight": (h,),
    }
    rng = np.random.default_rng(0)
    folder.mkdir()
    for k, (name, shape) in enumerate(shapes.items()):
        save_file({name: rng.standard_normal(shape, dtype=np.float32) * 0.02},
                  str(folder / f"model-{k + 1:05d}-of-{len(shapes):05d}.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return sum(4 * math.prod(s) for s in shapes.values())


def test_peak_memory_of_a_lazy_conversion_is_far_below_the_source(tmp_path):
    source_bytes = _write_big_checkpoint(tmp_path / "src")
    largest = 4 * _BIG_VOCAB * _BIG_HIDDEN
    assert (source_bytes, largest) == (83_898_368, 2**24)
    mx.clear_cache()
    mx.reset_peak_memory()
    run_convert(tmp_path / "src", tmp_path / "out")
    peak = mx.get_peak_memory()
    # Measured 18.5 MiB: one 16 MiB source tensor at a time plus its quantized output.
    assert peak < 2 * largest, peak
    assert peak < source_bytes / 3, peak
