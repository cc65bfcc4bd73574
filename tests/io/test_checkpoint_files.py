"""C1/C2: which files of a model folder are read. Pickle weights are refused without being opened,
repo code is never imported, and config.json errors are precise."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlxserve.errors import CorruptCheckpointError, ModelLoadError, UnsafeCheckpointError
from mlxserve.io.checkpoint_files import (
    TOKENIZER_FILE_NAMES,
    find_tokenizer_files,
    find_weight_files,
    read_config,
)


class CanaryPayload:
    """Unpickling this creates ``canary``: what a hostile pytorch_model.bin can do."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


def write_hostile_pickle(path: Path, canary: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": CanaryPayload(canary)}))


def test_payload_is_live(tmp_path):
    """The fixture is a real attack: unpickling it does run code (in a throwaway location)."""
    probe = tmp_path / "probe"
    write_hostile_pickle(tmp_path / "probe.bin", probe)
    pickle.loads((tmp_path / "probe.bin").read_bytes())
    assert probe.exists()


@pytest.mark.parametrize(
    "weight_name", ["pytorch_model.bin", "model.pt", "consolidated.00.pth", "last.ckpt"]
)
def test_pickle_only_folder_is_refused(tmp_path, weight_name):
    model = tmp_path / "tiny-model"
    model.mkdir()
    canary = tmp_path / "canary"
    write_hostile_pickle(model / weight_name, canary)
    (model / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UnsafeCheckpointError) as info:
        find_weight_files(model)
    assert str(info.value) == (
        f"tiny-model has only pickle-based weights ({weight_name}). Pickle files can run arbitrary "
        "code when loaded, so mlxserve never unpickles them. Use a repo or revision that ships "
        "*.safetensors (many repos have a 'refs/pr/N' revision from the safetensors conversion "
        "bot), or convert it yourself in a trusted, sandboxed environment with transformers: "
        "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)."
    )
    assert not canary.exists()
    assert sorted(p.name for p in model.iterdir()) == sorted(["config.json", weight_name])


def test_sharded_pickle_index_is_listed(tmp_path):
    canary = tmp_path / "canary"
    for i in (1, 2):
        write_hostile_pickle(tmp_path / f"pytorch_model-0000{i}-of-00002.bin", canary)
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError) as info:
        find_weight_files(tmp_path)
    assert str(info.value).startswith(
        f"{tmp_path.name} has only pickle-based weights (pytorch_model-00001-of-00002.bin, "
        "pytorch_model-00002-of-00002.bin, pytorch_model.bin.index.json). "
    )
    assert not canary.exists()


def test_mixed_formats_use_safetensors_only(tmp_path):
    canary = tmp_path / "canary"
    write_hostile_pickle(tmp_path / "pytorch_model.bin", canary)
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    assert find_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert not canary.exists()


def test_index_decides_the_shards(tmp_path):
    for i, name in enumerate(["b", "a"], start=1):
        save_file({name: np.ones(2, np.float32)}, str(tmp_path / f"model-0000{i}-of-00002.safetensors"))
    save_file({"stray": np.ones(1, np.float32)}, str(tmp_path / "unrelated.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "b": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors",
    }}))
    assert find_weight_files(tmp_path) == [
        tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors",
    ]


def test_index_with_traversal_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../outside.safetensors"}})
    )
    with pytest.raises(CorruptCheckpointError) as info:
        find_weight_files(tmp_path)
    assert str(info.value) == (
        "model.safetensors.index.json: shard name '../../outside.safetensors' is not a plain file "
        "name in the model folder"
    )


def test_consolidated_duplicate_is_skipped(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "consolidated.safetensors"))
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    assert find_weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        find_weight_files(tmp_path)
    assert type(info.value) is ModelLoadError
    assert str(info.value) == f"no weight files (*.safetensors) in {tmp_path.name}"


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{\n  "model_type": "llama"\n  "hidden_size": 8\n}',
         "config.json in m is not valid JSON: Expecting ',' delimiter at line 3 column 3"),
        ("", "config.json in m is not valid JSON: Expecting value at line 1 column 1"),
        ("[1, 2]", "config.json in m must be a JSON object, got list"),
        ("null", "config.json in m must be a JSON object, got NoneType"),
    ],
)
def test_invalid_config(tmp_path, content, expected):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    with pytest.raises(ModelLoadError) as info:
        read_config(folder)
    assert type(info.value) is ModelLoadError
    assert str(info.value) == expected


def test_config_not_utf8(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ModelLoadError) as info:
        read_config(folder)
    assert str(info.value) == "config.json in m is not UTF-8 (byte 7)"


def test_missing_config(tmp_path):
    folder = tmp_path / "just-files"
    folder.mkdir()
    with pytest.raises(ModelLoadError) as info:
        read_config(folder)
    assert str(info.value) == "no config.json in just-files: not a Hugging Face model folder"


def test_auto_map_code_is_never_imported(tmp_path):
    canary = tmp_path / "canary"
    code = f"import pathlib\npathlib.Path({str(canary)!r}).touch()\n"
    (tmp_path / "modeling_evil.py").write_text(code)
    (tmp_path / "tokenization_evil.py").write_text(code)
    config = {"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    assert read_config(tmp_path) == config
    assert find_tokenizer_files(tmp_path) == [tmp_path / "tokenizer_config.json"]
    assert not canary.exists()
    assert "modeling_evil" not in sys.modules and "tokenization_evil" not in sys.modules


def test_tokenizer_files_in_fixed_order(tmp_path):
    for name in reversed(TOKENIZER_FILE_NAMES):
        (tmp_path / name).write_text("{}")
    (tmp_path / "tokenizer.py").write_text("raise SystemExit")
    (tmp_path / "tokenizer.json.bak").write_text("{}")
    assert [p.name for p in find_tokenizer_files(tmp_path)] == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
        "generation_config.json",
    ]
