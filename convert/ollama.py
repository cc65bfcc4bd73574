"""Find a model in Ollama's local store: ``ollama:NAME[:TAG]`` -> its GGUF blob, template and params.

Store layout (``$OLLAMA_MODELS`` or ``~/.ollama/models``):

    manifests/registry.ollama.ai/library/NAME/TAG        official models ("library" namespace)
    manifests/registry.ollama.ai/NAMESPACE/NAME/TAG      user models (NAME given as "NAMESPACE/NAME")
    blobs/sha256-<64 hex>                                content-addressed layers

A manifest is JSON with ``layers: [{mediaType, digest: "sha256:<hex>", size}]``; the weights are the
``application/vnd.ollama.image.model`` layer (a GGUF file); the Go chat template, the default
parameters (JSON: stop strings, temperature, ...) and the system prompt are layers of their own.
Every blob we use is hashed while read and must match its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.errors import CorruptCheckpointError, ModelNotFoundError

PREFIX = "ollama:"
REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
TEMPLATE_MEDIA_TYPE = "application/vnd.ollama.image.template"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
SYSTEM_MEDIA_TYPE = "application/vnd.ollama.image.system"
MAX_MANIFEST_BYTES = 1 * 2**20
MAX_TEXT_LAYER_BYTES = 4 * 2**20
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_HASH_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class OllamaModel:
    """A resolved store entry. params: the params layer's JSON (e.g. ``{"stop": [...]}``) or None."""

    name: str
    tag: str
    model_blob: Path
    template: str | None = None
    params: dict[str, Any] | None = None
    system: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """What the converter records next to the model (ollama.json)."""
        return {"name": self.name, "tag": self.tag, "template": self.template, "params": self.params, "system": self.system}


def is_ollama_ref(src: str) -> bool:
    return isinstance(src, str) and src.startswith(PREFIX)


def ollama_models_dir() -> Path:
    configured = os.environ.get("OLLAMA_MODELS")
    return Path(configured).expanduser() if configured else Path.home() / ".ollama" / "models"


def find_ollama_model(ref: str, models_dir: Path | None = None) -> OllamaModel:
    """Resolve ``ollama:NAME[:TAG]``. Unknown name or tag -> ModelNotFoundError (listing what
    exists); a blob whose content does not match its digest -> CorruptCheckpointError."""
    namespace, name, tag = _parse_ref(ref)
    store = Path(models_dir) if models_dir is not None else ollama_models_dir()
    model_dir = store / "manifests" / REGISTRY / namespace / name
    display = name if namespace == DEFAULT_NAMESPACE else f"{namespace}/{name}"
    if not model_dir.is_dir():
        raise ModelNotFoundError(
            f"no Ollama model {display!r} in {store}; available: {_list_models(store) or 'none'}",
            param="model",
        )
    manifest_path = model_dir / tag
    if not manifest_path.is_file():
        tags = sorted(p.name for p in model_dir.iterdir() if p.is_file())
        raise ModelNotFoundError(
            f"Ollama model {display!r} has no tag {tag!r}; available tags: {', '.join(tags) or 'none'}",
            param="model",
        )
    layers = _read_manifest(manifest_path, f"{display}:{tag}")
    by_type = {layer["mediaType"]: layer for layer in layers}
    if MODEL_MEDIA_TYPE not in by_type:
        raise CorruptCheckpointError(f"Ollama manifest {display}:{tag} has no model layer")
    blobs = store / "blobs"
    model_blob = _verified_blob(blobs, by_type[MODEL_MEDIA_TYPE])
    params_text = _text_layer(blobs, by_type.get(PARAMS_MEDIA_TYPE))
    return OllamaModel(
        name=display, tag=tag, model_blob=model_blob,
        template=_text_layer(blobs, by_type.get(TEMPLATE_MEDIA_TYPE)),
        params=_parse_params(params_text, f"{display}:{tag}") if params_text is not None else None,
        system=_text_layer(blobs, by_type.get(SYSTEM_MEDIA_TYPE)),
    )


def _parse_ref(ref: str) -> tuple[str, str, str]:
    body = ref[len(PREFIX):] if is_ollama_ref(ref) else ref
    name_part, _, tag = body.partition(":")
    tag = tag or DEFAULT_TAG
    parts = name_part.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_NAMESPACE, *parts]
    if len(parts) != 2 or not all(_PART_RE.match(p) for p in (*parts, tag)):
        raise ModelNotFoundError(
            f"{ref!r} is not an Ollama model reference; use ollama:NAME[:TAG] or ollama:NAMESPACE/NAME[:TAG]",
            param="model",
        )
    return parts[0], parts[1], tag


def _list_models(store: Path) -> str:
    root = store / "manifests" / REGISTRY
    if not root.is_dir():
        return ""
    names = []
    for namespace in sorted(p for p in root.iterdir() if p.is_dir()):
        for model in sorted(p for p in namespace.iterdir() if p.is_dir()):
            prefix = "" if namespace.name == DEFAULT_NAMESPACE else f"{namespace.name}/"
            names += [f"{prefix}{model.name}:{t.name}" for t in sorted(model.iterdir()) if t.is_file()]
    return ", ".join(names)


def _read_manifest(path: Path, label: str) -> list[dict]:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"Ollama manifest {label} is larger than {MAX_MANIFEST_BYTES} bytes")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read Ollama manifest {label}: {e}") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    valid = isinstance(layers, list) and all(
        isinstance(x, dict) and isinstance(x.get("mediaType"), str) and isinstance(x.get("digest"), str)
        for x in layers
    )
    if not valid:
        raise CorruptCheckpointError(f"Ollama manifest {label} has no valid 'layers' list")
    return layers


def _blob_path(blobs: Path, layer: dict) -> tuple[Path, str]:
    match = _DIGEST_RE.match(layer["digest"])
    if match is None:
        raise CorruptCheckpointError(f"Ollama layer digest {layer['digest'][:80]!r} is not a sha256 digest")
    digest = match.group(1)
    for candidate in (blobs / f"sha256-{digest}", blobs / f"sha256:{digest}"):
        if candidate.is_file():
            return candidate, digest
    raise ModelNotFoundError(f"Ollama blob sha256-{digest[:12]}... is missing from {blobs}", param="model")


def _verified_blob(blobs: Path, layer: dict, max_bytes: int | None = None) -> Path:
    """The blob's path, after hashing all of it (streamed) against its digest and declared size."""
    path, digest = _blob_path(blobs, layer)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise CorruptCheckpointError(f"Ollama layer {path.name} is larger than {max_bytes} bytes")
    hasher, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read Ollama blob {path.name}: {e.strerror or e}") from None
    expected_size = layer.get("size")
    if isinstance(expected_size, int) and expected_size != size:
        raise CorruptCheckpointError(f"Ollama blob {path.name} is {size} bytes; the manifest says {expected_size}")
    if hasher.hexdigest() != digest:
        raise CorruptCheckpointError(f"Ollama blob {path.name} does not match its sha256 digest (corrupt download?)")
    return path


def _text_layer(blobs: Path, layer: dict | None) -> str | None:
    if layer is None:
        return None
    path = _verified_blob(blobs, layer, MAX_TEXT_LAYER_BYTES)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read Ollama layer {path.name}: {e}") from None


def _parse_params(text: str, label: str) -> dict[str, Any]:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"Ollama params of {label} are not JSON: {e}") from None
    if not isinstance(params, dict):
        raise CorruptCheckpointError(f"Ollama params of {label} are not a JSON object")
    return params
