"""Reading a Hugging Face source: local folders, hub ids (offline, never the network), and the up-front
checkpoint validation of convert/hf.py (C1, C2, C3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import mlxserve.convert.hf as hf
from mlxserve.convert.hf import HFCheckpoint, read_checkpoint, resolve_source
from mlxserve.errors import (
    CorruptCheckpointError,
    HubUnavailableError,
    ModelLoadError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from mlxserve.models import SUPPORTED_MODEL_TYPES

# ----------------------------------------------------------------------------------------- local


def test_existing_folder_is_returned(tmp_path):
    assert resolve_source(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("src", ["./no-such-model", "/no/such/model", "~/no-such-model-xyz", "a/b/c", "plainname"])
def test_missing_path_is_model_not_found(src):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source(src)
    assert type(info.value) is ModelNotFoundError
    assert str(info.value) == f"model folder {src!r} does not exist (hub repo ids look like 'org/name')"


def test_file_is_not_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    src = str(tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source(src)
    assert str(info.value) == f"model path {src!r} is a file, not a model folder"


# ------------------------------------------------------------------------------------------- hub


def _run_resolve_offline(hf_home: Path, repo_id: str) -> dict:
    """resolve_source in a fresh interpreter, so huggingface_hub reads HF_HOME/HF_HUB_OFFLINE at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # belt and braces: even a bug could only hit loopback
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    script = textwrap.dedent(f"""
        import json
        from mlxserve.convert.hf import resolve_source
        try:
            print(json.dumps({{"path": str(resolve_source({repo_id!r}))}}))
        except Exception as e:
            print(json.dumps({{"error": type(e).__name__, "message": str(e)}}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_offline_cache_miss_is_clear(tmp_path):
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    result = _run_resolve_offline(hf_home, "some-org/not-cached-model")
    assert result == {
        "error": "HubUnavailableError",
        "message": "'some-org/not-cached-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE "
        "is set. Download it elsewhere and pass the local folder, or unset HF_HUB_OFFLINE.",
    }


def test_offline_cache_hit_returns_snapshot(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--some-org--cached-model"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.ones(2, np.float32)}, str(snapshot / "model.safetensors"))
    result = _run_resolve_offline(tmp_path / "hf-home", "some-org/cached-model")
    assert result == {"path": str(snapshot)}


def _http_error(cls, status: int):
    """An HTTP error of huggingface_hub's tree without building a real response (resolve_source reads none)."""
    error = cls.__new__(cls)
    Exception.__init__(error, f"{status} boom")
    return error


def _hub_error_cases():
    from huggingface_hub import errors

    return [
        (lambda: errors.LocalEntryNotFoundError("cannot reach"), HubUnavailableError,
         "could not reach the Hugging Face hub to download 'org/name' (offline?). Download it elsewhere "
         "and pass the local folder, or check your network and retry."),
        (lambda: _http_error(errors.RepositoryNotFoundError, 404), ModelNotFoundError,
         "no model 'org/name' on the Hugging Face hub (if it is private, log in with `hf auth login` or "
         "set HF_TOKEN)"),
        (lambda: _http_error(errors.GatedRepoError, 403), ModelNotFoundError,
         "'org/name' is gated: accept its license on huggingface.co, then log in (`hf auth login`) or "
         "set HF_TOKEN"),
        (lambda: _http_error(errors.RevisionNotFoundError, 404), ModelNotFoundError,
         "revision 'v9' of 'org/name' does not exist on the Hugging Face hub"),
        (lambda: _http_error(errors.HfHubHTTPError, 503), HubUnavailableError,
         "could not reach the Hugging Face hub to download 'org/name' (offline?). Download it elsewhere "
         "and pass the local folder, or check your network and retry. (HfHubHTTPError)"),
        (lambda: ConnectionResetError(104, "reset"), HubUnavailableError,
         "could not reach the Hugging Face hub to download 'org/name' (offline?). Download it elsewhere "
         "and pass the local folder, or check your network and retry. (ConnectionResetError)"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_hub_errors_are_mapped(monkeypatch, case):
    import huggingface_hub
    from huggingface_hub import constants

    make_error, error_cls, message = _hub_error_cases()[case]

    def fake_snapshot_download(repo_id, **kwargs):
        assert kwargs["allow_patterns"] == ["*.json", "model*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(error_cls) as info:
        resolve_source("org/name", revision="v9")
    assert type(info.value) is error_cls
    assert str(info.value) == message


def test_hub_pickle_only_repo_is_refused(monkeypatch, tmp_path):
    import huggingface_hub

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    monkeypatch.setattr(
        huggingface_hub, "list_repo_files", lambda repo_id, revision=None: ["config.json", "pytorch_model.bin"]
    )
    with pytest.raises(UnsafeCheckpointError) as info:
        resolve_source("org/pickled")
    assert str(info.value).startswith("'org/pickled' has only pickle-based weights (pytorch_model.bin). ")


# ------------------------------------------------------------------------------------ checkpoint


@pytest.fixture
def registry_stub(monkeypatch):
    """Model modules are other engineers' work: accept the supported types without importing them."""
    real = hf.get_model_module

    def stub(model_type):
        if model_type in SUPPORTED_MODEL_TYPES:
            return None
        return real(model_type)

    monkeypatch.setattr(hf, "get_model_module", stub)


def make_checkpoint(folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "torch_dtype": "bfloat16"}))
    save_file({"a": np.ones((2, 3), np.float16), "b": np.zeros(4, np.int32)},
              str(folder / "model-00001-of-00002.safetensors"))
    save_file({"c": np.ones((5,), np.float32)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def test_read_checkpoint(tmp_path, registry_stub):
    folder = make_checkpoint(tmp_path / "src")
    ckpt = read_checkpoint(folder)
    assert ckpt == HFCheckpoint(
        path=folder,
        config={"model_type": "llama", "torch_dtype": "bfloat16"},
        model_type="llama",
        weight_files=(folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"),
        tokenizer_files=(folder / "tokenizer.json", folder / "tokenizer_config.json"),
        source_dtype="bfloat16",
        num_parameters=6 + 4 + 5,
        total_bytes=6 * 2 + 4 * 4 + 5 * 4,
    )


def test_source_dtype_from_headers(tmp_path, registry_stub):
    folder = make_checkpoint(tmp_path / "src", {"model_type": "qwen2"})
    assert read_checkpoint(folder).source_dtype == "float16"
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "dtype": "float32"}))
    assert read_checkpoint(folder).source_dtype == "float32"


def test_read_checkpoint_with_real_registry(tmp_path):
    pytest.importorskip("mlxserve.models.llama")
    ckpt = read_checkpoint(make_checkpoint(tmp_path / "src"))
    assert ckpt.model_type == "llama"


def test_unknown_model_type_lists_supported(tmp_path):
    folder = make_checkpoint(tmp_path / "src", {"model_type": "mamba9"})
    with pytest.raises(UnsupportedModelError) as info:
        read_checkpoint(folder)
    assert str(info.value) == (
        f"model_type 'mamba9' is not supported by mlxserve; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def test_missing_model_type(tmp_path):
    folder = make_checkpoint(tmp_path / "src", {"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ModelLoadError) as info:
        read_checkpoint(folder)
    assert type(info.value) is ModelLoadError
    assert str(info.value) == "config.json in src has no 'model_type'"


def test_remote_code_architecture_is_not_imported(tmp_path):
    """C2: an auto_map architecture is unsupported, and its code never runs."""
    folder = make_checkpoint(tmp_path / "src", {
        "model_type": "evil_arch",
        "auto_map": {"AutoModelForCausalLM": "modeling_evil_arch.EvilForCausalLM"},
    })
    canary = tmp_path / "canary"
    (folder / "modeling_evil_arch.py").write_text(f"import pathlib\npathlib.Path({str(canary)!r}).touch()\n")
    with pytest.raises(UnsupportedModelError) as info:
        read_checkpoint(folder)
    assert str(info.value).startswith("model_type 'evil_arch' is not supported by mlxserve; supported: ")
    assert not canary.exists()
    assert "modeling_evil_arch" not in sys.modules


def test_every_header_is_validated_up_front(tmp_path, registry_stub):
    folder = make_checkpoint(tmp_path / "src")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])  # truncated download
    with pytest.raises(CorruptCheckpointError) as info:
        read_checkpoint(folder)
    assert str(info.value) == (
        "model-00002-of-00002.safetensors: tensor 'c' ends at byte 20 but the data section holds 16 bytes"
    )


def test_duplicate_tensors_without_index(tmp_path, registry_stub):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.ones(2, np.float32)}, str(folder / "model-a.safetensors"))
    save_file({"w": np.ones(2, np.float32)}, str(folder / "model-b.safetensors"))
    with pytest.raises(CorruptCheckpointError) as info:
        read_checkpoint(folder)
    assert str(info.value) == "tensor 'w' is stored in both model-a.safetensors and model-b.safetensors"


def test_pickle_only_checkpoint(tmp_path, registry_stub):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not-opened")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(folder)
    assert str(info.value).startswith("src has only pickle-based weights (pytorch_model.bin). ")
