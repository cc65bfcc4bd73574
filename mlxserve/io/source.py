"""Where a model lives: an existing local folder, or a Hugging Face repo id downloaded to the cache.

Only data files are downloaded (no ``*.py`` remote code, no pickle weights). Offline mode
(HF_HUB_OFFLINE) and network failures become one-line errors that say what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlxserve.errors import (
    HubUnavailableError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from mlxserve.io.checkpoint_files import (
    PICKLE_WEIGHT_PATTERNS,
    unsafe_checkpoint_message,
)
from mlxserve.model_store import cached_path

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

# ------------------------------------------------------------------------------------------ source


def resolve_model_path(src: str, *, revision: str | None = None) -> Path:
    """A local model folder for ``src``: an existing folder, a cached model name, or a hub repo id.

    Raises ModelNotFoundError for a missing path or unknown repo, HubUnavailableError when the hub
    cannot be reached (or HF_HUB_OFFLINE is set) and the repo is not in the local cache.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model path {src!r} is a file, not a model folder")
    cached = cached_path(src)  # a name from `mlxserve models`
    if cached is not None:
        return cached
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
