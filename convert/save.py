"""Write an MLX model folder atomically: a complete folder appears at ``out``, or nothing does.

Layout of a saved folder (mlx-lm compatible):

    out/
      model.safetensors                      one shard, or model-00001-of-0000N.safetensors ...
      model.safetensors.index.json           {"metadata": {"total_size": N}, "weight_map": {...}}
      config.json                            sorted keys, indent 4
      tokenizer.json, ...                    copied source tokenizer files, extra_files
      mlxserve_manifest.json                 written last: every file's size and sha256

Everything is written into ``.<out>.partial-<pid>-<hex>`` next to ``out`` (same filesystem, so the
final rename is atomic), fsynced, then renamed into place. On any failure the staging folder is
removed and an existing ``out`` is left as it was. A run killed with SIGKILL leaves only a staging
folder, which the next run into the same ``out`` removes.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxserve.errors import ConvertError, CorruptCheckpointError, MlxServeError
from mlxserve.io.safetensors import fsync_fd, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "mlxserve_manifest.json"
MANIFEST_FORMAT = "mlxserve-model"
SAFETENSORS_METADATA = {"format": "mlx"}  # what mlx-lm writes and checks for
_RESERVED_NAMES = frozenset({"config.json", INDEX_NAME, MANIFEST_NAME})
_COPY_CHUNK = 4 * 2**20
_SPACE_MARGIN = 1 * 2**20  # headers, index and manifest beyond the tensor bytes

ProgressFn = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class SaveReport:
    """path: the final folder. total_bytes: size of every file written except the manifest."""

    path: Path
    num_shards: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class FileRecord:
    size: int
    sha256: str


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (a module function so tests can replace it)."""
    return shutil.disk_usage(path).free


def save_model_dir(
    out: Path,
    tensors: Mapping[str, mx.array],
    config: Mapping,
    *,
    tokenizer_files: Sequence[Path] = (),
    extra_files: Mapping[str, bytes | str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: ProgressFn | None = None,
    consume: bool = False,
) -> SaveReport:
    """Write ``tensors`` + ``config`` (+ tokenizer and extra files) as an MLX model folder at ``out``.

    Tensors are evaluated and written one at a time, in mapping order. ``progress(n)`` is called
    with the number of bytes just written (an increment, like ``tqdm.update``). With ``consume=True``
    (``tensors`` must be a dict you own) each entry is popped once written, so evaluated weights
    are freed as the save advances. Raises ConvertError; KeyboardInterrupt passes through as is.
    """
    out = Path(out)
    if out.parent.is_dir():
        recover_interrupted_saves(out)
    _check_target(out, overwrite, tokenizer_files)
    if max_shard_bytes <= 0:
        raise ConvertError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not tensors:
        raise ConvertError(f"no tensors to save into '{out.name}'")
    shards = plan_shards(tensors, max_shard_bytes)
    small_files = _small_files(config, tokenizer_files, extra_files)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _as_convert_error(e, out) from e
    _check_disk_space(out, tensors, small_files)

    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        records = _write_shards(staging, tensors, shards, progress, consume)
        records.update(_write_small_files(staging, small_files, progress))
        _write_file(staging / MANIFEST_NAME, _manifest_bytes(records))  # last: marks completeness
        _fsync_dir(staging)
        _promote(staging, out, overwrite)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, MlxServeError) or not isinstance(e, Exception):
            raise  # ours are already precise; KeyboardInterrupt/SystemExit stay what they are
        raise _as_convert_error(e, out) from e
    return SaveReport(path=out, num_shards=len(shards), total_bytes=sum(r.size for r in records.values()))


# -------------------------------------------------------------------------------------- preflight


def _check_target(out: Path, overwrite: bool, tokenizer_files: Sequence[Path]) -> None:
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConvertError(f"output folder '{out.name}' already exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise ConvertError(f"cannot replace '{out.name}': it is not a folder")
    # --overwrite deletes the old folder: refuse anything that is not a model folder we could rebuild.
    if not ((out / "config.json").exists() or (out / MANIFEST_NAME).exists() or not any(out.iterdir())):
        raise ConvertError(
            f"refusing to replace '{out.name}' with --overwrite: it does not look like a model "
            "folder (no config.json)"
        )
    resolved = out.resolve()
    if any(Path(p).resolve().parent == resolved for p in tokenizer_files):
        raise ConvertError(f"cannot overwrite '{out.name}': it is the source of the tokenizer files")


def plan_shards(tensors: Mapping[str, mx.array], max_shard_bytes: int) -> list[list[str]]:
    """Split names, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += arr.nbytes
    shards.append(current)
    return shards


def shard_file_name(index: int, num_shards: int) -> str:
    """mlx-lm / transformers naming; index is 0-based."""
    if num_shards == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"


def _small_files(
    config: Mapping,
    tokenizer_files: Sequence[Path],
    extra_files: Mapping[str, bytes | str] | None,
) -> dict[str, bytes | Path]:
    """Every non-weight file to write: name -> content (bytes) or a source file to copy."""
    try:
        files: dict[str, bytes | Path] = {"config.json": _config_bytes(config)}
    except (TypeError, ValueError) as e:
        raise ConvertError(f"config is not JSON serializable: {e}") from e
    sources = [(Path(p).name, Path(p)) for p in tokenizer_files]
    extras = [
        (name, data.encode("utf-8") if isinstance(data, str) else bytes(data))
        for name, data in (extra_files or {}).items()
    ]
    for name, content in sources + extras:
        if not _is_plain_name(name) or name in _RESERVED_NAMES or name.endswith(".safetensors"):
            raise ConvertError(f"cannot write an extra file named {name!r} into the model folder")
        if name in files:
            raise ConvertError(f"two files named {name!r} were given to save")
        if isinstance(content, Path) and not content.is_file():
            raise ConvertError(f"tokenizer file '{name}' does not exist")
        files[name] = content
    return files


def _config_bytes(config: Mapping) -> bytes:
    return (json.dumps(dict(config), indent=4, sort_keys=True) + "\n").encode("utf-8")


def _is_plain_name(name: str) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


def _check_disk_space(out: Path, tensors: Mapping[str, mx.array], files: Mapping[str, bytes | Path]) -> None:
    tensor_bytes = sum(arr.nbytes for arr in tensors.values())
    other = sum(c.stat().st_size if isinstance(c, Path) else len(c) for c in files.values())
    required = tensor_bytes + other + _SPACE_MARGIN
    available = disk_free_bytes(out.parent)
    if available < required:
        raise ConvertError(
            f"not enough disk space to write '{out.name}': need about {_human(required)} "
            f"({required} bytes), {_human(available)} ({available} bytes) available"
        )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------------------------------------ write


def _write_shards(
    staging: Path,
    tensors: Mapping[str, mx.array],
    shards: list[list[str]],
    progress: ProgressFn | None,
    consume: bool,
) -> dict[str, FileRecord]:
    records: dict[str, FileRecord] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, names in enumerate(shards):
        shard = shard_file_name(i, len(shards))
        total_size += sum(tensors[n].nbytes for n in names)
        weight_map.update(dict.fromkeys(names, shard))
        hasher = hashlib.sha256()
        size = write_safetensors(
            staging / shard, tensors, SAFETENSORS_METADATA,
            names=names, on_write=_observer(hasher, progress), consume=consume,
        )
        records[shard] = FileRecord(size=size, sha256=hasher.hexdigest())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    index_bytes = (json.dumps(index, indent=4) + "\n").encode("utf-8")
    records[INDEX_NAME] = _write_file(staging / INDEX_NAME, index_bytes, progress)
    return records


def _write_small_files(
    staging: Path, files: Mapping[str, bytes | Path], progress: ProgressFn | None
) -> dict[str, FileRecord]:
    records = {}
    for name, content in files.items():
        if isinstance(content, Path):
            records[name] = _copy_file(content, staging / name, progress)
        else:
            records[name] = _write_file(staging / name, content, progress)
    return records


def _observer(hasher, progress: ProgressFn | None) -> Callable[[memoryview], None]:
    def observe(chunk: memoryview) -> None:
        hasher.update(chunk)
        if progress is not None:
            progress(chunk.nbytes)

    return observe


def _write_file(path: Path, data: bytes, progress: ProgressFn | None = None) -> FileRecord:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        fsync_fd(f.fileno())
    if progress is not None:
        progress(len(data))
    return FileRecord(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _copy_file(src: Path, dst: Path, progress: ProgressFn | None) -> FileRecord:
    """Copy (following symlinks, as HF cache snapshots use them) while hashing."""
    hasher = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            fout.write(chunk)
            hasher.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
        fout.flush()
        fsync_fd(fout.fileno())
    return FileRecord(size=size, sha256=hasher.hexdigest())


def _manifest_bytes(records: Mapping[str, FileRecord]) -> bytes:
    doc = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(records.items())},
    }
    return (json.dumps(doc, indent=4) + "\n").encode("utf-8")


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data files are already synced
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- promote


def _promote(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to ``out``; an old ``out`` is moved aside, then deleted."""
    if not (overwrite and os.path.lexists(out)):
        os.rename(staging, out)
        _fsync_dir(out.parent)
        return
    backup = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, backup)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(backup, out)  # put the previous complete version back
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _as_convert_error(e: Exception, out: Path) -> ConvertError:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return ConvertError(
            f"ran out of disk space while writing '{out.name}'; the partial output was removed "
            "and nothing was replaced"
        )
    if isinstance(e, OSError):
        return ConvertError(
            f"could not write '{out.name}' ({e.strerror or type(e).__name__}); the partial output "
            "was removed and nothing was replaced"
        )
    return ConvertError(f"saving '{out.name}' failed ({type(e).__name__}: {e}); nothing was written")


# --------------------------------------------------------------------------------------- recovery


def recover_interrupted_saves(out: Path) -> None:
    """Clean up after runs into ``out`` that were killed (SIGKILL, power loss).

    Removes dead runs' staging folders. A run killed between moving the old ``out`` aside and
    renaming the new one in leaves ``out`` missing: the old complete folder is put back.
    """
    parent, pattern = out.parent, glob.escape(out.name)
    for partial in parent.glob(f".{pattern}.partial-*"):
        if _owner_is_dead(partial.name):
            shutil.rmtree(partial, ignore_errors=True)
    olds = sorted(
        (p for p in parent.glob(f".{pattern}.old-*") if _owner_is_dead(p.name)),
        key=lambda p: p.stat().st_mtime,
    )
    if olds and not os.path.lexists(out):
        os.rename(olds.pop(), out)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _owner_is_dead(name: str) -> bool:
    """Staging names end in -<pid>-<hex>; a folder whose pid is not running is stale."""
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive, owned by someone else
    return False


def verify_model_dir(path: Path, *, check_hashes: bool = False) -> None:
    """Raise CorruptCheckpointError unless ``path`` is a complete folder written by save_model_dir."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text("utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path.name} is incomplete: no valid {MANIFEST_NAME}") from e
    if not isinstance(files, dict):
        raise CorruptCheckpointError(f"{path.name} is incomplete: no valid {MANIFEST_NAME}")
    for name, record in files.items():
        target = path / name
        size = record.get("size") if isinstance(record, dict) else None
        if not _is_plain_name(name) or not target.is_file() or target.stat().st_size != size:
            raise CorruptCheckpointError(f"{path.name} is incomplete: {name!r} is missing or truncated")
        if check_hashes and _sha256_file(target) != record.get("sha256"):
            raise CorruptCheckpointError(f"{path.name} is corrupt: sha256 of {name!r} does not match")


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
