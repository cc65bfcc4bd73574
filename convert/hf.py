"""Read a Hugging Face source checkpoint (a local folder or a hub repo id) without running its code.

``resolve_source`` turns what the user typed into a local folder, downloading only data files from
the hub. ``read_checkpoint`` validates that folder up front: config, model type, every safetensors
header. Nothing here imports repo code or unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxserve.errors import (
    CorruptCheckpointError,
    ModelLoadError,
)
from mlxserve.io.checkpoint_files import (
    find_tokenizer_files,
    find_weight_files,
    read_config,
)
from mlxserve.io.safetensors import SafetensorsHeader, read_header
from mlxserve.models import get_model_module

from mlxserve.io.source import HUB_ALLOW_PATTERNS, is_repo_id  # noqa: F401 (re-exported)
from mlxserve.io.source import resolve_model_path as resolve_source  # noqa: F401 (re-exported)

_FLOAT_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True, slots=True)
class HFCheckpoint:
    """A validated Hugging Face checkpoint folder. total_bytes: tensor data bytes, all shards."""

    path: Path
    config: dict
    model_type: str
    weight_files: tuple[Path, ...]
    tokenizer_files: tuple[Path, ...]
    source_dtype: str | None
    num_parameters: int
    total_bytes: int


# -------------------------------------------------------------------------------------- checkpoint


def read_checkpoint(folder: Path) -> HFCheckpoint:
    """Validate ``folder`` up front: config, model type, every safetensors header."""
    folder = Path(folder)
    config = read_config(folder)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"config.json in {folder.name} has no 'model_type'")
    get_model_module(model_type)  # UnsupportedModelError listing the supported types
    weight_files = tuple(find_weight_files(folder))
    headers = [read_header(p) for p in weight_files]
    _check_no_duplicates(weight_files, headers)
    return HFCheckpoint(
        path=folder,
        config=config,
        model_type=model_type,
        weight_files=weight_files,
        tokenizer_files=tuple(find_tokenizer_files(folder)),
        source_dtype=_source_dtype(config, headers),
        num_parameters=sum(i.num_elements for h in headers for i in h.tensors.values()),
        total_bytes=sum(i.nbytes for h in headers for i in h.tensors.values()),
    )


def _check_no_duplicates(files: tuple[Path, ...], headers: list[SafetensorsHeader]) -> None:
    owner: dict[str, str] = {}
    for path, header in zip(files, headers):
        for name in header.tensors:
            if name in owner:
                raise CorruptCheckpointError(
                    f"tensor {name!r} is stored in both {owner[name]} and {path.name}"
                )
            owner[name] = path.name


def _source_dtype(config: dict, headers: list[SafetensorsHeader]) -> str | None:
    """``torch_dtype`` (transformers < 5) or ``dtype`` from config, else the first float tensor's."""
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value:
            return value.removeprefix("torch.")
    for header in headers:
        for info in header.tensors.values():
            if info.dtype in _FLOAT_DTYPE_NAMES:
                return _FLOAT_DTYPE_NAMES[info.dtype]
    return None
