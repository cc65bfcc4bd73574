"""Which files of a Hugging Face model folder mlxserve reads, and which it refuses.

Only data formats are read: safetensors, JSON, sentencepiece/BPE vocab files and chat templates.
Pickle-based weights (``*.bin``, ``*.pt``, ...) can run arbitrary code when unpickled, and repo
Python files (``*.py``, named by ``auto_map``) are code: mlxserve never loads either.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxserve.errors import ModelLoadError, UnsafeCheckpointError
from mlxserve.io.safetensors import validate_index

SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 16 * 2**20

# Pickle-based weight formats (torch.save, PyTorch Lightning, Meta's consolidated.*.pth).
PICKLE_WEIGHT_PATTERNS: tuple[str, ...] = (
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.bin.index.json",
)

TOKENIZER_FILE_NAMES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of ``folder``, validated when an index names them.

    With ``model.safetensors.index.json``: its shards, after checking every header against it.
    Without: every top-level ``*.safetensors``. Pickle weights are never returned; a folder that
    has only those raises ``UnsafeCheckpointError``.
    """
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        shards = sorted(set(validate_index(folder, SAFETENSORS_INDEX).values()))
        return [folder / shard for shard in shards]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    # Mistral repos ship the same weights twice: consolidated.safetensors (Meta layout) and model*.
    others = [p for p in files if not p.name.startswith("consolidated")]
    if others:
        files = others
    if files:
        return files
    pickles = find_pickle_files(folder)
    if pickles:
        raise UnsafeCheckpointError(unsafe_checkpoint_message(folder.name, [p.name for p in pickles]))
    raise ModelLoadError(f"no weight files (*.safetensors) in {folder.name}")


def find_pickle_files(folder: Path) -> list[Path]:
    """Pickle-based weight files (and their indexes) in ``folder``; listed, never opened."""
    found = {p for pattern in PICKLE_WEIGHT_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(found)


def unsafe_checkpoint_message(where: str, pickle_names: list[str]) -> str:
    shown = ", ".join(pickle_names[:3]) + (", ..." if len(pickle_names) > 3 else "")
    return (
        f"{where} has only pickle-based weights ({shown}). Pickle files can run arbitrary code "
        "when loaded, so mlxserve never unpickles them. Use a repo or revision that ships "
        "*.safetensors (many repos have a 'refs/pr/N' revision from the safetensors conversion "
        "bot), or convert it yourself in a trusted, sandboxed environment with transformers: "
        "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)."
    )


def read_config(folder: Path) -> dict:
    """Parse ``folder/config.json`` into a dict; ModelLoadError with a precise reason otherwise."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {folder.name}: not a Hugging Face model folder")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelLoadError(f"config.json in {folder.name} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read config.json in {folder.name} ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"config.json in {folder.name} is not UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"config.json in {folder.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except (ValueError, RecursionError) as e:
        raise ModelLoadError(f"config.json in {folder.name} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"config.json in {folder.name} must be a JSON object, got {type(config).__name__}"
        )
    # NOTE(io): `auto_map` (and `trust_remote_code` architectures) point at repo Python files.
    # We ignore them on purpose: only our own model definitions run, picked by `model_type`.
    return config


def find_tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer/generation data files present in ``folder``, in TOKENIZER_FILE_NAMES order.

    Never returns code (``*.py`` tokenizers named by ``auto_map`` are ignored on purpose).
    """
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILE_NAMES if (folder / name).is_file()]
