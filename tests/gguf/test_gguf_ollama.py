"""Sources: a .gguf file, a folder holding one, or ``ollama:NAME[:TAG]`` in a fake Ollama store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from _gguf_builder import build_gguf
from mlxserve.convert.gguf import GGUFSource, convert_gguf, resolve_gguf_source
from mlxserve.convert.ollama import find_ollama_model

from mlxserve.errors import ConvertError, CorruptCheckpointError, ModelNotFoundError
from mlxserve.tokenizer.wrapper import Tokenizer

TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"
PARAMS = {"stop": ["<|im_end|>", "###"], "temperature": 0.7, "top_k": 20, "num_ctx": 4096}


def add_blob(store: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_model(store: Path, name: str, tag: str, gguf: bytes, *, template: str | None = TEMPLATE,
              params: dict | None = PARAMS, namespace: str = "library") -> None:
    layers = [{"mediaType": "application/vnd.ollama.image.model", **add_blob(store, gguf)}]
    if template is not None:
        layers.append({"mediaType": "application/vnd.ollama.image.template", **add_blob(store, template.encode())})
    if params is not None:
        layers.append({"mediaType": "application/vnd.ollama.image.params", **add_blob(store, json.dumps(params).encode())})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **add_blob(store, b"{}")},
                "layers": layers}
    folder = store / "manifests" / "registry.ollama.ai" / namespace / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tag).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_ckpt, tmp_path_factory) -> Path:
    return build_gguf(tiny_ckpt("qwen2"), tmp_path_factory.mktemp("ollama-gguf") / "tiny.gguf", "qwen2").path


@pytest.fixture
def store(tmp_path, tiny_gguf, monkeypatch) -> Path:
    root = tmp_path / "ollama-models"
    data = tiny_gguf.read_bytes()
    add_model(root, "tiny", "latest", data)
    add_model(root, "tiny", "v2", data, params=None, template=None)
    add_model(root, "custom", "1b", data, namespace="me")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


def blob_of(store: Path, data: bytes) -> Path:
    return store / "blobs" / f"sha256-{hashlib.sha256(data).hexdigest()}"


def test_ollama_name_resolves_to_the_model_blob(store, tiny_gguf):
    source = resolve_gguf_source("ollama:tiny")
    assert source.path == blob_of(store, tiny_gguf.read_bytes()) and Path(source) == source.path
    assert (source.ollama.name, source.ollama.tag) == ("tiny", "latest")
    assert source.ollama.template == TEMPLATE and source.ollama.params == PARAMS
    assert resolve_gguf_source("ollama:tiny:latest") == source
    v2 = resolve_gguf_source("ollama:tiny:v2")
    assert (v2.ollama.tag, v2.ollama.template, v2.ollama.params) == ("v2", None, None)
    assert resolve_gguf_source("ollama:me/custom:1b").ollama.name == "me/custom"


def test_default_store_is_under_home(tmp_path, tiny_gguf, monkeypatch):
    add_model(tmp_path / ".ollama" / "models", "tiny", "latest", tiny_gguf.read_bytes())
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_gguf_source("ollama:tiny").ollama.tag == "latest"


def test_missing_tag_lists_the_available_tags(store):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_gguf_source("ollama:tiny:q8_0")
    assert str(info.value) == "Ollama model 'tiny' has no tag 'q8_0'; available tags: latest, v2"


def test_missing_model_lists_the_available_models(store):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_gguf_source("ollama:llama3.2")
    assert str(info.value) == f"no Ollama model 'llama3.2' in {store}; available: tiny:latest, tiny:v2, me/custom:1b"


@pytest.mark.parametrize("ref", ["ollama:../etc", "ollama:a/b/c", "ollama:tiny:..", "ollama:"])
def test_malformed_reference_is_refused(store, ref):
    with pytest.raises(ModelNotFoundError, match="is not an Ollama model reference"):
        resolve_gguf_source(ref)


def test_blob_that_does_not_match_its_digest_is_corrupt(store, tiny_gguf):
    blob = blob_of(store, tiny_gguf.read_bytes())
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"Ollama blob {blob.name} does not match its sha256 digest"):
        resolve_gguf_source("ollama:tiny")


def test_truncated_blob_is_corrupt(store, tiny_gguf):
    blob = blob_of(store, tiny_gguf.read_bytes())
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=f"Ollama blob {blob.name} is 100 bytes; the manifest says"):
        find_ollama_model("ollama:tiny:latest")


def test_missing_blob_is_reported(store, tiny_gguf):
    blob_of(store, tiny_gguf.read_bytes()).unlink()
    with pytest.raises(ModelNotFoundError, match="is missing from"):
        resolve_gguf_source("ollama:tiny")


def test_convert_from_ollama_records_template_and_params(store, tmp_path):
    result = convert_gguf(resolve_gguf_source("ollama:tiny"), tmp_path / "out", quantize=False, dtype="float32")
    assert result.model_type == "qwen2"
    record = json.loads((tmp_path / "out" / "ollama.json").read_text())
    assert record == {"name": "tiny", "tag": "latest", "template": TEMPLATE, "params": PARAMS, "system": None}
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    # "<|im_end|>" is a special token (already the eos); "###" is text, so a stop string.
    assert generation == {"bos_token_id": 3, "eos_token_id": 2, "pad_token_id": 0, "stop_strings": ["###"],
                          "temperature": 0.7, "top_k": 20}
    assert Tokenizer.from_pretrained(tmp_path / "out").eos_token_ids == {2}


def test_file_and_folder_sources(tmp_path, tiny_gguf):
    assert resolve_gguf_source(str(tiny_gguf)) == GGUFSource(path=tiny_gguf)
    assert resolve_gguf_source(tiny_gguf.parent) == GGUFSource(path=tiny_gguf)
    blob = tmp_path / "sha256-abc"  # a GGUF without the suffix is recognised by its magic
    blob.write_bytes(tiny_gguf.read_bytes())
    assert resolve_gguf_source(blob) == GGUFSource(path=blob)
    (tmp_path / "notes.txt").write_text("hello")
    assert resolve_gguf_source(tmp_path / "notes.txt") is None
    assert resolve_gguf_source(tmp_path / "absent") is None
    assert resolve_gguf_source("org/some-hf-repo") is None
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    assert resolve_gguf_source(hf_folder) is None


def test_folder_with_several_ggufs_is_ambiguous(tmp_path, tiny_gguf):
    for name in ("b-Q8_0.gguf", "a-Q4_K_M.gguf"):
        (tmp_path / name).write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ConvertError) as info:
        resolve_gguf_source(tmp_path)
    assert str(info.value) == (
        f"folder '{tmp_path.name}' holds several GGUF files (a-Q4_K_M.gguf, b-Q8_0.gguf); pass one of them"
    )
