"""Read a Hugging Face source checkpoint (a local folder or a hub repo id) without running its code.

``resolve_source`` turns what the user typed into a local folder, downloading only data files from
the hub. ``read_checkpoint`` validates that folder up front: config, model type, every safetensors
header. Nothing here imports repo code or unpickles anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlxserve.errors import (
    CorruptCheckpointError,
    HubUnavailableError,
    ModelLoadError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from mlxserve.io.checkpoint_files import (
    PICKLE_WEIGHT_PATTERNS,
    find_tokenizer_files,
    find_weight_files,
    read_config,
    unsafe_checkpoint_message,
)
from mlxserve.io.safetensors import SafetensorsHeader, read_header
from mlxserve.models import get_model_module

# Data files only: no *.py (remote code), no *.bin/*.pt (pickle). "model*" skips the duplicate
# consolidated.safetensors of Mistral repos.
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.txt",
    "*.jinja",
)

# huggingface_hub's own repo id rule: [namespace/]name of [\w.-], no "--" or "..", <= 96 chars.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")

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


# ------------------------------------------------------------------------------------------ source


def resolve_source(src: str, *, revision: str | None = None) -> Path:
    """A local model folder for ``src``: an existing folder, or a hub repo id ``org/name``.

    Raises ModelNotFoundError for a missing path or unknown repo, HubUnavailableError when the hub
    cannot be reached (or HF_HUB_OFFLINE is set) and the repo is not in the local cache.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model path {src!r} is a file, not a model folder")
    if _looks_like_path(src) or not is_repo_id(src):
        raise ModelNotFoundError(
            f"model folder {src!r} does not exist (hub repo ids look like 'org/name')"
        )
    folder = _snapshot_download(src, revision)
    _refuse_pickle_only_repo(src, revision, folder)
    return folder


def is_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and "--" not in src and ".." not in src


def _looks_like_path(src: str) -> bool:
    return src.startswith(("/", "./", "../", "~", ".\\")) or src in (".", "..") or (
        os.sep != "/" and os.sep in src
    )


def _snapshot_download(repo_id: str, revision: str | None) -> Path:
    # Imported lazily: huggingface_hub is only needed for hub ids and reads HF_* env at import.
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(HUB_ALLOW_PATTERNS)
        )
    except hf_errors.RevisionNotFoundError as e:
        raise ModelNotFoundError(
            f"revision {revision!r} of {repo_id!r} does not exist on the Hugging Face hub"
        ) from e
    except hf_errors.GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is gated: accept its license on huggingface.co, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"no model {repo_id!r} on the Hugging Face hub (if it is private, log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from e
    except hf_errors.LocalEntryNotFoundError as e:
        raise HubUnavailableError(_unreachable_message(repo_id, _offline())) from e
    except hf_errors.HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is not a valid Hugging Face repo id") from e
    except Exception as e:  # network stack errors (httpx, OSError, HTTP 5xx) mid-download
        raise HubUnavailableError(
            f"{_unreachable_message(repo_id, _offline())} ({type(e).__name__})"
        ) from e
    return Path(folder)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _unreachable_message(repo_id: str, offline: bool) -> str:
    if offline:
        return (
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            "Download it elsewhere and pass the local folder, or unset HF_HUB_OFFLINE."
        )
    return (
        f"could not reach the Hugging Face hub to download {repo_id!r} (offline?). "
        "Download it elsewhere and pass the local folder, or check your network and retry."
    )


def _refuse_pickle_only_repo(repo_id: str, revision: str | None, folder: Path) -> None:
    """We download no pickle files, so ask the hub whether a weightless snapshot is pickle-only."""
    if any(folder.glob("*.safetensors")):
        return
    try:
        import huggingface_hub

        repo_files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # offline or hub error: read_checkpoint will report "no weight files"
        return
    pickles = sorted(f for f in repo_files if any(Path(f).match(p) for p in PICKLE_WEIGHT_PATTERNS))
    if pickles:
        raise UnsafeCheckpointError(unsafe_checkpoint_message(repr(repo_id), pickles))


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
