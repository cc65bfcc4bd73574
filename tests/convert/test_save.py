"""Atomic MLX model folder writer (C4, C5): a complete folder or nothing, never a partial one."""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlxserve.convert.save as save
import mlxserve.io.safetensors as st
from mlxserve.convert.save import (
    SaveReport,
    plan_shards,
    recover_interrupted_saves,
    save_model_dir,
    verify_model_dir,
)
from mlxserve.errors import ConvertError, CorruptCheckpointError
from mlxserve.io.safetensors import read_header, validate_index

CONFIG = {"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}, "b": {"z": 1, "a": 2}}


def sample_tensors() -> dict[str, mx.array]:
    w = mx.random.normal((8, 64), key=mx.random.key(0))
    qw, scales, biases = mx.quantize(w, group_size=64, bits=4)
    return {
        "model.embed_tokens.weight": mx.arange(24, dtype=mx.float32).reshape(4, 6).astype(mx.bfloat16),
        "model.norm.weight": mx.linspace(0, 1, 6),
        "q_proj.weight": qw,  # uint32, packed 4-bit
        "q_proj.scales": scales.astype(mx.float16),
        "q_proj.biases": biases.astype(mx.float16),
        "positions": mx.arange(5, dtype=mx.int32),
    }


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def assert_same_tensors(folder: Path, expected: dict[str, mx.array]) -> None:
    loaded = {}
    for f in sorted(folder.glob("*.safetensors")):
        loaded.update(mx.load(str(f)))
    assert sorted(loaded) == sorted(expected)
    for name, arr in expected.items():
        assert loaded[name].dtype == arr.dtype, name
        assert mx.array_equal(loaded[name], arr).item(), name


def make_previous(out: Path) -> dict[str, mx.array]:
    """A complete earlier version of ``out``."""
    old = {"old.weight": mx.full((3,), 7.0)}
    save_model_dir(out, old, {"model_type": "llama", "version": "old"})
    return old


def assert_previous_intact(out: Path, old: dict[str, mx.array]) -> None:
    verify_model_dir(out, check_hashes=True)
    assert json.loads((out / "config.json").read_text())["version"] == "old"
    assert_same_tensors(out, old)


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_single_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    tensors = sample_tensors()
    out = tmp_path / "out"
    increments: list[int] = []
    report = save_model_dir(
        out, tensors, CONFIG, tokenizer_files=[src / "tokenizer.json"],
        extra_files={"README.md": "# tiny\n"}, progress=increments.append,
    )
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "mlxserve_manifest.json", "model.safetensors",
                     "model.safetensors.index.json", "tokenizer.json"]
    sizes = {f: (out / f).stat().st_size for f in files if f != "mlxserve_manifest.json"}
    assert report == SaveReport(path=out, num_shards=1, total_bytes=sum(sizes.values()))
    assert sum(increments) == report.total_bytes
    assert (out / "config.json").read_text() == json.dumps(CONFIG, indent=4, sort_keys=True) + "\n"
    assert json.loads((out / "model.safetensors.index.json").read_text()) == {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": {name: "model.safetensors" for name in sorted(tensors)},
    }
    assert dict(read_header(out / "model.safetensors").metadata) == {"format": "mlx"}
    manifest = json.loads((out / "mlxserve_manifest.json").read_text())
    assert {name: rec["size"] for name, rec in manifest["files"].items()} == sizes
    verify_model_dir(out, check_hashes=True)
    assert_same_tensors(out, tensors)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert leftovers(tmp_path) == []


def test_sharding_splits_at_max_shard_bytes(tmp_path):
    tensors = {f"layers.{i}.w": mx.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    out = tmp_path / "out"
    report = save_model_dir(out, tensors, {"model_type": "llama"}, max_shard_bytes=1000)
    assert report.num_shards == 5
    expected_map = {f"layers.{i}.w": f"model-0000{i // 2 + 1}-of-00005.safetensors" for i in range(10)}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 4000}, "weight_map": dict(sorted(expected_map.items()))}
    assert validate_index(out) == expected_map
    for k in range(1, 6):
        shard = out / f"model-0000{k}-of-00005.safetensors"
        assert list(read_header(shard).tensors) == [f"layers.{2 * k - 2}.w", f"layers.{2 * k - 1}.w"]
    assert_same_tensors(out, tensors)


def test_plan_shards_oversized_tensor_goes_alone():
    tensors = {"a": mx.zeros((100,)), "big": mx.zeros((500,)), "c": mx.zeros((100,)), "d": mx.zeros((100,))}
    assert plan_shards(tensors, 1000) == [["a"], ["big"], ["c", "d"]]


def test_consume_frees_tensors_as_written(tmp_path):
    tensors = sample_tensors()
    expected = dict(tensors)
    save_model_dir(tmp_path / "out", tensors, CONFIG, consume=True, max_shard_bytes=256)
    assert tensors == {}
    assert_same_tensors(tmp_path / "out", expected)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
def test_output_loads_in_mlx_lm(tmp_path, quantized):
    from mlx_lm.models import llama
    from mlx_lm.utils import load_model

    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
              "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "vocab_size": 64,
              "tie_word_embeddings": True}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantized:
        nn.quantize(model, group_size=64, bits=4)
        config["quantization"] = {"group_size": 64, "bits": 4}
    weights = dict(tree_flatten(model.parameters()))
    save_model_dir(tmp_path / "out", weights, config, max_shard_bytes=20_000)
    loaded, _ = load_model(tmp_path / "out")
    reloaded = dict(tree_flatten(loaded.parameters()))
    assert sorted(reloaded) == sorted(weights)
    for name, arr in weights.items():
        assert reloaded[name].dtype == arr.dtype and mx.array_equal(reloaded[name], arr).item(), name


# --------------------------------------------------------------------------------------- refusals


def test_existing_out_without_overwrite(tmp_path):
    out = tmp_path / "out"
    old = make_previous(out)
    with pytest.raises(ConvertError) as info:
        save_model_dir(out, sample_tensors(), CONFIG)
    assert str(info.value) == "output folder 'out' already exists; pass --overwrite to replace it"
    assert_previous_intact(out, old)
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_completely(tmp_path):
    out = tmp_path / "out"
    make_previous(out)
    (out / "stale-extra.txt").write_text("from the old version")
    tensors = sample_tensors()
    save_model_dir(out, tensors, CONFIG, overwrite=True)
    assert not (out / "stale-extra.txt").exists()
    assert_same_tensors(out, tensors)
    verify_model_dir(out, check_hashes=True)
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_non_model_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ConvertError) as info:
        save_model_dir(out, sample_tensors(), CONFIG, overwrite=True)
    assert str(info.value) == (
        "refusing to replace 'out' with --overwrite: it does not look like a model folder (no config.json)"
    )
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"config.json": "{}"}, "cannot write an extra file named 'config.json' into the model folder"),
        ({"../escape.txt": "x"}, "cannot write an extra file named '../escape.txt' into the model folder"),
        ({"model-00001.safetensors": b""}, "cannot write an extra file named 'model-00001.safetensors' into the model folder"),
    ],
)
def test_bad_extra_file_names(tmp_path, extra, expected):
    with pytest.raises(ConvertError) as info:
        save_model_dir(tmp_path / "out", sample_tensors(), CONFIG, extra_files=extra)
    assert str(info.value) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_preflight_disk_space(tmp_path, monkeypatch):
    monkeypatch.setattr(save, "disk_free_bytes", lambda path: 1000)
    tensors = sample_tensors()
    required = (sum(a.nbytes for a in tensors.values())
                + len(json.dumps(CONFIG, indent=4, sort_keys=True) + "\n") + 2**20)
    with pytest.raises(ConvertError) as info:
        save_model_dir(tmp_path / "out", tensors, CONFIG)
    assert str(info.value) == (
        f"not enough disk space to write 'out': need about 1.0 MiB ({required} bytes), "
        "1000 B (1000 bytes) available"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ faults mid-write


def fail_on_second_shard(monkeypatch) -> None:
    real = save.write_safetensors
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(save, "write_safetensors", flaky)


class FullDisk:
    """open() for the safetensors module whose files raise ENOSPC once ``budget`` bytes are written."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def open(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        disk = self

        class Limited:
            def write(self, data):
                n = memoryview(data).nbytes
                if n > disk.budget:
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.budget -= n
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Limited()


FAULTS = {
    "io-error-after-first-shard": (
        lambda mp: fail_on_second_shard(mp), ConvertError,
        "could not write 'out' (Input/output error); the partial output was removed and nothing was replaced",
    ),
    "enospc-mid-shard": (
        lambda mp: mp.setattr(st, "open", FullDisk(budget=300).open, raising=False), ConvertError,
        "ran out of disk space while writing 'out'; the partial output was removed and nothing was replaced",
    ),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "over-previous"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_mid_write_leaves_nothing(tmp_path, monkeypatch, fault, overwrite):
    out = tmp_path / "out"
    old = make_previous(out) if overwrite else None
    inject, error_cls, message = FAULTS[fault]
    inject(monkeypatch)
    with pytest.raises(error_cls) as info:
        save_model_dir(out, sample_tensors(), CONFIG, overwrite=overwrite, max_shard_bytes=256)
    assert type(info.value) is error_cls
    assert str(info.value) == message
    if overwrite:
        assert_previous_intact(out, old)
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "over-previous"])
def test_keyboard_interrupt_mid_write(tmp_path, overwrite):
    out = tmp_path / "out"
    old = make_previous(out) if overwrite else None
    seen = []

    def interrupt(n):
        seen.append(n)
        if sum(seen) > 300:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model_dir(out, sample_tensors(), CONFIG, overwrite=overwrite, max_shard_bytes=256, progress=interrupt)
    if overwrite:
        assert_previous_intact(out, old)
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failed_promotion_restores_previous(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = make_previous(out)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.partial-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(save.os, "rename", rename)
    with pytest.raises(ConvertError) as info:
        save_model_dir(out, sample_tensors(), CONFIG, overwrite=True)
    assert str(info.value) == (
        "could not write 'out' (Invalid cross-device link); the partial output was removed and nothing was replaced"
    )
    monkeypatch.undo()
    assert_previous_intact(out, old)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ stale state


def test_stale_staging_is_removed_but_live_is_kept(tmp_path):
    dead = tmp_path / ".out.partial-999999999-deadbeef"
    garbage = tmp_path / ".out.partial-garbage"
    other_out = tmp_path / ".other.partial-999999999-deadbeef"
    for folder in (dead, garbage, other_out):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.partial-{sleeper.pid}-cafecafe"
        live.mkdir()
        save_model_dir(tmp_path / "out", sample_tensors(), CONFIG)
        assert leftovers(tmp_path) == [live.name]
        assert other_out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_interrupted_promotion_restores_previous(tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: the old one comes back."""
    out = tmp_path / "out"
    old = make_previous(out)
    os.rename(out, tmp_path / ".out.old-999999999-abcd1234")
    recover_interrupted_saves(out)
    assert_previous_intact(out, old)
    assert leftovers(tmp_path) == []


def test_verify_rejects_partial_folder(tmp_path):
    out = tmp_path / "out"
    save_model_dir(out, sample_tensors(), CONFIG)
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CorruptCheckpointError) as info:
        verify_model_dir(out)
    assert str(info.value) == "out is incomplete: 'model.safetensors' is missing or truncated"
    (out / "mlxserve_manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError) as info:
        verify_model_dir(out)
    assert str(info.value) == "out is incomplete: no valid mlxserve_manifest.json"


# --------------------------------------------------------------------------------------- SIGKILL

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import mlx.core as mx
    from mlxserve.convert.save import save_model_dir

    out, kill_at, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    tensors = {f"layers.{i}.weight": mx.full((64, 256), float(i)) for i in range(16)}
    written = 0

    def progress(n):
        global written
        written += n
        if written >= kill_at:
            if mode == "self":
                os.kill(os.getpid(), signal.SIGKILL)
            print("READY", flush=True)
            time.sleep(120)

    save_model_dir(out, tensors, {"model_type": "llama", "version": "new"}, overwrite=True,
                   max_shard_bytes=200_000, progress=progress)
    print("DONE", flush=True)
""")


def child_tensors() -> dict[str, mx.array]:
    return {f"layers.{i}.weight": mx.full((64, 256), float(i)) for i in range(16)}


@pytest.fixture(scope="module")
def child_total_bytes(tmp_path_factory) -> int:
    ref = tmp_path_factory.mktemp("ref") / "out"
    return save_model_dir(ref, child_tensors(), {"model_type": "llama", "version": "new"},
                          max_shard_bytes=200_000).total_bytes


def run_child(tmp_path: Path, out: Path, kill_at: int, mode: str) -> int:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(kill_at), mode],
                            stdout=subprocess.PIPE, text=True)
    if mode == "signal":
        assert proc.stdout.readline().strip() == "READY"
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    proc.stdout.close()
    return proc.returncode


def assert_recovers(tmp_path: Path, out: Path) -> None:
    """After a kill: one partial staging folder, never accepted; a rerun succeeds and cleans it up."""
    staging = [tmp_path / name for name in leftovers(tmp_path)]
    assert len(staging) == 1 and staging[0].name.startswith(".out.partial-")
    with pytest.raises(CorruptCheckpointError):
        verify_model_dir(staging[0])
    tensors = child_tensors()
    save_model_dir(out, tensors, {"model_type": "llama"}, overwrite=True, max_shard_bytes=200_000)
    verify_model_dir(out, check_hashes=True)
    assert_same_tensors(out, tensors)
    assert leftovers(tmp_path) == []


# 20 kill points (C4): both ends, two fixed, and 16 seeded random byte offsets.
_RNG = random.Random(2024)
KILL_FRACTIONS = [0.0, 0.31, 0.77, 0.9999] + [round(_RNG.random(), 4) for _ in range(16)]


@pytest.mark.parametrize("fraction", KILL_FRACTIONS)
def test_sigkill_at_byte_offset_leaves_no_output(tmp_path, child_total_bytes, fraction):
    out = tmp_path / "out"
    kill_at = max(1, int(fraction * child_total_bytes))
    assert run_child(tmp_path, out, kill_at, "self") == -signal.SIGKILL
    assert not out.exists()
    assert_recovers(tmp_path, out)


def test_external_sigkill_keeps_previous_version(tmp_path, child_total_bytes):
    out = tmp_path / "out"
    old = make_previous(out)
    assert run_child(tmp_path, out, child_total_bytes // 2, "signal") == -signal.SIGKILL
    assert_previous_intact(out, old)
    assert_recovers(tmp_path, out)
