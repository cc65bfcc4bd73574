"""`mlxserve convert`: the summary it prints, and every user error as exit 1 with one line on stderr,
no traceback, and nothing written (no OUT, no staging folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures.checkpoints import build_weights
from mlxserve.cli import app
from mlxserve.convert.save import MANIFEST_NAME
from mlxserve.convert.verify import compare

runner = CliRunner()
LLAMA_NUM_PARAMETERS = sum(w.size for w in build_weights("llama").values())


def invoke(*args: str):
    return runner.invoke(app, ["convert", *map(str, args)])


def assert_user_error(result, message: str) -> None:
    """Exit 1, exactly ``error: <message>`` on stderr, nothing on stdout, no traceback."""
    assert (result.exit_code, result.stderr, result.stdout) == (1, f"error: {message}\n", "")
    assert "Traceback" not in result.output


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------- success


def test_convert_prints_the_summary(tiny_ckpt, tmp_path):
    src, out = tiny_ckpt("llama"), tmp_path / "out"
    result = invoke(src, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"

    total_size = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    size_mib = sum(p.stat().st_size for p in out.iterdir() if p.name != MANIFEST_NAME) / 2**20
    v = compare(src, out)  # deterministic: the same numbers the command printed
    head, sizes, verify = result.stderr.splitlines()
    assert head == "Converted llama (0.1M parameters, 4-bit affine, group 64)"
    assert LLAMA_NUM_PARAMETERS == 139_584
    seconds = sizes.rsplit(", ", 1)[1]
    assert sizes == f"  {8 * total_size / LLAMA_NUM_PARAMETERS:.2f} bits per weight, {size_mib:.1f} MiB, {seconds}"
    assert sizes.startswith("  5.06 bits per weight, 0.1 MiB, ") and seconds.endswith(" s")
    assert float(seconds.removesuffix(" s")) >= 0.0
    assert verify == (
        f"  verify: max |logit diff| {v.max_abs_diff:.4g}, mean KL {v.mean_kl:.4g}, "
        f"top-1 agreement {v.top1_agreement:.1%} over 81 positions"
    )
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_no_quantize_summary(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    result = invoke(tiny_ckpt("llama"), "-o", out, "--no-quantize", "--dtype", "bfloat16", "--no-verify")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "Converted llama (0.1M parameters, not quantized)"
    assert lines[1].startswith("  16.00 bits per weight, 0.3 MiB, ") and len(lines) == 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_quantization_flags_reach_the_output(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    result = invoke(tiny_ckpt("llama"), "--mlx-path", out, "--q-bits", "4", "--q-group-size", "32",
                    "--quant-recipe", "mixed_4_8", "--no-verify")
    assert result.exit_code == 0, result.output
    # mixed_4_8 on 2 layers: embed_tokens, lm_head and v/down_proj of both layers at 8 bits
    assert result.stderr.splitlines()[0] == (
        "Converted llama (0.1M parameters, 4-bit affine, group 32, 6 layers at other widths)"
    )
    quant = json.loads((out / "config.json").read_text())["quantization"]
    eight = {"group_size": 32, "bits": 8, "mode": "affine"}
    # 2 layers: both are edge layers, so v_proj and down_proj join the head and embeddings at 8 bits.
    high = ["model.embed_tokens", "lm_head"] + [
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.v_proj", "mlp.down_proj")
    ]
    assert quant == {"group_size": 32, "bits": 4, "mode": "affine", "non_divisible": "keep-full-precision",
                     **dict.fromkeys(high, eight)}


# ------------------------------------------------------------------------------------ OUT exists


def test_existing_output_is_an_error_and_untouched(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke(tiny_ckpt("llama"), "-o", out)
    assert_user_error(result, f"output '{out}' already exists; pass --overwrite to replace it")
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_a_previous_conversion(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    assert invoke(tiny_ckpt("llama"), "-o", out, "--q-bits", "8", "--no-verify").exit_code == 0
    result = invoke(tiny_ckpt("llama"), "-o", out, "--overwrite", "--no-verify")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_refuses_a_folder_that_is_not_a_model(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke(tiny_ckpt("llama"), "-o", out, "--overwrite", "--no-verify")
    assert_user_error(
        result, "refusing to replace 'out' with --overwrite: it does not look like a model folder (no config.json)"
    )
    assert os.listdir(out) == ["notes.txt"]
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ bad sources


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header_length(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + path.read_bytes()[8:])


def _unknown_dtype(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"F32"', b'"Q32"', 1))  # same length: only the dtype is wrong


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")


PICKLE_MESSAGE = (
    "src has only pickle-based weights (pytorch_model.bin). Pickle files can run arbitrary code when loaded, "
    "so mlxserve never unpickles them. Use a repo or revision that ships *.safetensors (many repos have a "
    "'refs/pr/N' revision from the safetensors conversion bot), or convert it yourself in a trusted, sandboxed "
    "environment with transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
    "safe_serialization=True)."
)

BAD_SOURCES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-config": (lambda f: (f / "config.json").unlink(), "no config.json in src: not a Hugging Face model folder"),
    "invalid-config": (
        lambda f: (f / "config.json").write_text('{"model_type": "llama",'),
        "config.json in src is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 24",
    ),
    "unknown-model-type": (
        lambda f: edit_config(f, model_type="mamba2"),
        "model_type 'mamba2' is not supported by mlxserve; supported: gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3",
    ),
    "pickle-only": (_pickle_only, PICKLE_MESSAGE),
    "truncated": (
        _truncate,
        "model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' ends at byte 295168 but the data section holds 278092 bytes",
    ),
    "header-length": (_huge_header_length, "model.safetensors: header length 1099511627776 exceeds the 100000000-byte limit"),
    "unknown-dtype": (_unknown_dtype, "model.safetensors: tensor 'lm_head.weight' has unknown dtype 'Q32'"),
    "shape-mismatch": (
        lambda f: edit_config(f, intermediate_size=256),
        "weight model.layers.1.mlp.up_proj.weight in src has shape (128, 64), the config implies (256, 64) (6 mismatched)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_writes_nothing(tiny_ckpt, tmp_path, case):
    damage, message = BAD_SOURCES[case]
    src = copy_checkpoint(tiny_ckpt("llama"), tmp_path / "src")
    damage(src)
    out = tmp_path / "out"
    assert_user_error(invoke(src, "-o", out), message)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_missing_shard(tiny_ckpt, tmp_path):
    src = copy_checkpoint(tiny_ckpt("llama", shards=2), tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    assert_user_error(
        invoke(src, "-o", tmp_path / "out"),
        "model.safetensors.index.json: shard 'model-00002-of-00002.safetensors' is missing",
    )
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_missing_source_folder(tmp_path):
    src = tmp_path / "nope"
    message = f"model folder '{src}' does not exist (hub repo ids look like 'org/name')"
    assert_user_error(invoke(src, "-o", tmp_path / "out"), message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--q-bits", "7"], "--q-bits 7 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        (["--q-bits", "1"], "--q-bits 1 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        (["--q-bits", "16"], "--q-bits 16 is not valid for affine; use one of 2, 3, 4, 5, 6, 8"),
        (["--q-group-size", "48"], "--q-group-size 48 is not valid for affine; use one of 32, 64, 128"),
        (["--q-mode", "int4"], "--q-mode must be one of affine, mxfp4, nvfp4, mxfp8, not 'int4'"),
        (["--q-mode", "mxfp4", "--q-group-size", "32", "--q-bits", "8"], "--q-bits 8 is not valid for mxfp4; use one of 4"),
        (["--dtype", "float64"], "--dtype must be one of float16, bfloat16, float32, not 'float64'"),
        (["--quant-recipe", "nope"], (
            "--quant-recipe 'nope' is neither a recipe (uniform, high-embed, mixed_2_6, mixed_3_4, mixed_3_6, "
            "mixed_4_6, mixed_4_8) nor a JSON file"
        )),
    ],
    ids=["bits7", "bits1", "bits16", "group48", "mode", "mxfp4-bits8", "dtype", "recipe"],
)
def test_bad_flags(tiny_ckpt, tmp_path, flags, message):
    assert_user_error(invoke(tiny_ckpt("llama"), "-o", tmp_path / "out", *flags), message)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------- real process


def test_real_process_exit_code_and_stderr(tiny_ckpt, tmp_path):
    """The console path (python -m mlxserve): exit status 1 and one stderr line, no traceback."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLXSERVE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlxserve", "convert", str(tiny_ckpt("llama")), "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"error: output '{out}' already exists; pass --overwrite to replace it\n"
    assert os.listdir(out) == []
