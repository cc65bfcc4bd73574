"""The local model cache: converted models kept under ``~/.cache/mlxserve/models/<name>``.

The cache folder is ``$MLXSERVE_HOME`` if set, else ``$XDG_CACHE_HOME/mlxserve``, else
``~/.cache/mlxserve``. Each model folder holds ``mlxserve_source.json`` saying where it came from.
A cached model can be named instead of a path anywhere a model is expected
(``mlxserve generate -m smollm2-135m-instruct-f32``). Stdlib only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlxserve.errors import InvalidRequestError, ModelNotFoundError

SOURCE_FILE = "mlxserve_source.json"
MANIFEST_FILE = "mlxserve_manifest.json"  # written last by the converter: marks a complete folder
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    source: str
    bits: int | None  # None: not quantized
    dtype: str | None
    size_bytes: int


def cache_dir() -> Path:
    if os.environ.get("MLXSERVE_HOME"):
        return Path(os.environ["MLXSERVE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mlxserve"


def models_dir() -> Path:
    return cache_dir() / "models"


def check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise InvalidRequestError(f"{name!r} is not a valid model name (letters, digits, '.', '_', '-')", param="model")
    return name


def cached_path(name: str) -> Path | None:
    """The folder of a complete cached model called ``name``, or None."""
    if not _NAME.match(name) or ".." in name:
        return None
    path = models_dir() / name
    return path if (path / MANIFEST_FILE).is_file() and (path / "config.json").is_file() else None


def write_source_info(path: Path, *, source: str, bits: int | None, dtype: str | None) -> None:
    info = {"source": source, "bits": bits, "dtype": dtype}
    (path / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _read_info(path: Path) -> dict:
    try:
        info = json.loads((path / SOURCE_FILE).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[CachedModel]:
    """Complete cached models, by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if cached_path(path.name) is None:
            continue
        info = _read_info(path)
        out.append(CachedModel(
            name=path.name, path=path, source=str(info.get("source", "?")), bits=info.get("bits"),
            dtype=info.get("dtype"), size_bytes=_size(path),
        ))
    return out


def remove_model(name: str) -> Path:
    """Delete a cached model; returns the folder removed."""
    check_name(name)
    path = models_dir() / name
    if not path.is_dir():
        names = ", ".join(m.name for m in list_models()) or "none"
        raise ModelNotFoundError(f"no cached model named {name!r} (cached: {names})", param="model")
    shutil.rmtree(path)
    return path
