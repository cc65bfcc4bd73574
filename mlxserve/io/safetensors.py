"""Strict safetensors reading and a streaming safetensors writer.

File layout (https://github.com/huggingface/safetensors):

    [u64 little-endian N][N bytes of UTF-8 JSON header, space padded][data section]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets
relative to the start of the data section, plus an optional ``"__metadata__"`` str -> str map.

We validate every header ourselves, before MLX reads a byte of tensor data: a hostile file must fail
with a ``CorruptCheckpointError`` naming the file, never with an MLX crash or a giant allocation.
Messages carry the file's base name only, never an absolute path.

NOTE(io): ``mx.load`` on a safetensors file is lazy: it parses the header and returns arrays whose
data is read from the file when they are evaluated (checked on mlx 0.32: bytes overwritten after
``mx.load`` but before ``mx.eval`` show up in the result). So ``load_tensors`` costs no tensor I/O.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import mlx.core as mx
import numpy as np

from mlxserve.errors import CorruptCheckpointError, ModelLoadError

MAX_HEADER_BYTES = 100_000_000  # same cap as the reference Rust implementation
MAX_TENSOR_NAME_CHARS = 1024
MAX_INDEX_BYTES = 64 * 2**20
MAX_NDIM = 64  # real checkpoints use <= 5; the cap keeps hostile shapes cheap to check
METADATA_KEY = "__metadata__"
_HEADER_ALIGN = 8  # the data section starts 8-byte aligned: header padded with spaces

# safetensors dtype -> bytes per element
DTYPE_ITEMSIZE: Mapping[str, int] = MappingProxyType({
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
})
# Valid in the format but rejected by mx.load on mlx 0.32 ("[safetensor] unsupported dtype").
# F8_E4M3 does load, as raw uint8 bytes (mlx-lm dequantizes FP8 checkpoints from those).
MLX_UNLOADABLE_DTYPES = frozenset({"F64", "F8_E5M2"})
_MX_FROM_ST = {"F8_E4M3": mx.uint8}

_ST_FROM_MX: Mapping[mx.Dtype, str] = MappingProxyType({
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8",
    mx.uint16: "U16", mx.int16: "I16", mx.float16: "F16", mx.bfloat16: "BF16",
    mx.uint32: "U32", mx.int32: "I32", mx.float32: "F32",
    mx.uint64: "U64", mx.int64: "I64", mx.float64: "F64", mx.complex64: "C64",
})


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One header entry. begin/end: byte offsets into the data section (end exclusive)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header. data_offset: absolute file offset of the data section."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] | None
    data_offset: int


# --------------------------------------------------------------------------------------------- read


def read_header(path: Path) -> SafetensorsHeader:
    """Read and fully validate the header of ``path``; reads no tensor data."""
    path = Path(path)
    fname = path.name
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = _read_header_len(f, fname, file_size)
            raw = f.read(header_len)
    except OSError as e:
        raise CorruptCheckpointError(f"{fname}: cannot read file ({e.strerror or e})") from e
    if len(raw) != header_len:
        raise CorruptCheckpointError(f"{fname}: file was truncated while reading its header")
    data_offset = 8 + header_len
    doc = _parse_header_json(raw, fname)
    metadata = _parse_metadata(doc.pop(METADATA_KEY, None), fname)
    tensors = {name: _parse_entry(name, entry, fname) for name, entry in doc.items()}
    _check_tiling(tensors, file_size - data_offset, fname)
    return SafetensorsHeader(
        tensors=MappingProxyType(tensors),
        metadata=None if metadata is None else MappingProxyType(metadata),
        data_offset=data_offset,
    )


def _read_header_len(f, fname: str, file_size: int) -> int:
    if file_size < 8:
        raise CorruptCheckpointError(
            f"{fname}: file is {file_size} bytes, shorter than the 8-byte header length prefix"
        )
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len == 0:
        raise CorruptCheckpointError(f"{fname}: header length is 0")
    if header_len > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{fname}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if 8 + header_len > file_size:
        raise CorruptCheckpointError(
            f"{fname}: header length {header_len} runs past the end of the file ({file_size} bytes)"
        )
    return header_len


def _parse_header_json(raw: bytes, fname: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{fname}: header is not valid UTF-8 (byte {e.start})") from e

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:  # json.loads would silently keep the last one
                raise CorruptCheckpointError(f"{fname}: duplicate key {_short(key)} in header")
            out[key] = value
        return out

    try:
        doc = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(
            f"{fname}: header is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
        ) from e
    except ValueError as e:  # e.g. an integer literal beyond Python's 4300-digit limit
        raise CorruptCheckpointError(f"{fname}: header is not valid JSON ({e})") from e
    except RecursionError as e:
        raise CorruptCheckpointError(f"{fname}: header JSON is nested too deeply") from e
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(
            f"{fname}: header must be a JSON object, got {type(doc).__name__}"
        )
    return doc


def _parse_metadata(value: object, fname: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CorruptCheckpointError(f"{fname}: {METADATA_KEY} must map strings to strings")
    return dict(value)


def _parse_entry(name: str, entry: object, fname: str) -> TensorInfo:
    _check_name(name, fname)
    tag = f"{fname}: tensor {_short(name)}"
    # Extra keys are ignored, as the reference implementation does.
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CorruptCheckpointError(
            f"{tag} must be an object with 'dtype', 'shape' and 'data_offsets'"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise CorruptCheckpointError(f"{tag} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise CorruptCheckpointError(
            f"{tag} has invalid shape {_short(shape)}: dimensions must be non-negative integers"
        )
    if len(shape) > MAX_NDIM:
        raise CorruptCheckpointError(f"{tag} has {len(shape)} dimensions, more than {MAX_NDIM}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
        _is_int(o) and 0 <= o < 2**64 for o in offsets
    ):
        raise CorruptCheckpointError(
            f"{tag} has invalid data_offsets {_short(offsets)}: need two non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise CorruptCheckpointError(f"{tag} has data_offsets [{begin}, {end}] with begin > end")
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if end - begin != expected:
        raise CorruptCheckpointError(
            f"{tag} spans {end - begin} bytes but shape {shape} of {dtype} needs {expected}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_name(name: str, fname: str) -> None:
    if not name:
        raise CorruptCheckpointError(f"{fname}: empty tensor name")
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise CorruptCheckpointError(
            f"{fname}: tensor name of {len(name)} characters exceeds the "
            f"{MAX_TENSOR_NAME_CHARS}-character limit"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        # Names reach logs and error messages: no forged lines.
        raise CorruptCheckpointError(f"{fname}: tensor name {_short(name)} has control characters")


def _check_tiling(tensors: Mapping[str, TensorInfo], data_len: int, fname: str) -> None:
    """The spec requires the tensors to tile the data section exactly: no overlap, no hole."""
    pos, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.end > data_len:
            raise CorruptCheckpointError(
                f"{fname}: tensor {_short(name)} ends at byte {info.end} but the data section "
                f"holds {data_len} bytes"
            )
        if info.begin < pos:
            raise CorruptCheckpointError(
                f"{fname}: tensor {_short(name)} overlaps tensor {_short(prev)}"
            )
        if info.begin > pos:
            raise CorruptCheckpointError(
                f"{fname}: {info.begin - pos} unused bytes before tensor {_short(name)} "
                "(hole in the data section)"
            )
        pos, prev = info.end, name
    if pos != data_len:
        raise CorruptCheckpointError(
            f"{fname}: {data_len - pos} trailing bytes after the last tensor"
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------- index


def validate_index(folder: Path, index_name: str = "model.safetensors.index.json") -> dict[str, str]:
    """Validate a sharded checkpoint's index against its shards. Returns tensor name -> shard name."""
    folder = Path(folder)
    weight_map = _read_weight_map(folder / index_name, index_name)
    for shard in sorted(set(weight_map.values())):
        _check_shard_name(shard, index_name)
        if not (folder / shard).is_file():
            raise CorruptCheckpointError(f"{index_name}: shard {shard!r} is missing")
    stored = {}
    for shard in sorted(set(weight_map.values())):
        for name in read_header(folder / shard).tensors:
            stored[name] = shard
            listed = weight_map.get(name)
            if listed is None:
                raise CorruptCheckpointError(
                    f"{index_name}: tensor {_short(name)} in {shard} is not listed in the index"
                )
            if listed != shard:
                raise CorruptCheckpointError(
                    f"{index_name}: tensor {_short(name)} is listed under {listed} "
                    f"but stored in {shard}"
                )
    for name, shard in weight_map.items():
        if name not in stored:
            raise CorruptCheckpointError(
                f"{index_name}: tensor {_short(name)} is listed under {shard} but {shard} lacks it"
            )
    return weight_map


def _read_weight_map(path: Path, index_name: str) -> dict[str, str]:
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CorruptCheckpointError(f"{index_name}: larger than {MAX_INDEX_BYTES} bytes")
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CorruptCheckpointError(f"{index_name}: cannot read file ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{index_name}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CorruptCheckpointError(f"{index_name}: must be a JSON object with a 'weight_map' object")
    if not isinstance(doc.get("metadata", {}), (dict, type(None))):
        raise CorruptCheckpointError(f"{index_name}: 'metadata' must be an object")
    weight_map = doc["weight_map"]
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptCheckpointError(
            f"{index_name}: 'weight_map' must map tensor names to shard file names"
        )
    if not weight_map:
        raise CorruptCheckpointError(f"{index_name}: 'weight_map' is empty")
    return weight_map


def _check_shard_name(shard: str, index_name: str) -> None:
    """Shards are plain file names in the checkpoint folder: no traversal, no absolute paths."""
    plain = (
        shard not in ("", ".", "..")
        and "/" not in shard
        and "\\" not in shard
        and "\x00" not in shard
        and not os.path.isabs(shard)
        and Path(shard).name == shard
    )
    if not plain:
        raise CorruptCheckpointError(
            f"{index_name}: shard name {_short(shard)} is not a plain file name in the model folder"
        )
    if not shard.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{index_name}: shard {_short(shard)} is not a .safetensors file")


# --------------------------------------------------------------------------------------------- load


def load_tensors(files: Sequence[Path]) -> dict[str, mx.array]:
    """Validate every header, then ``mx.load`` each file lazily (no tensor data read here)."""
    headers = {Path(f): read_header(Path(f)) for f in files}
    owner: dict[str, str] = {}
    for path, header in headers.items():
        for name, info in header.tensors.items():
            if name in owner:
                raise CorruptCheckpointError(
                    f"tensor {_short(name)} is stored in both {owner[name]} and {path.name}"
                )
            owner[name] = path.name
            if info.dtype in MLX_UNLOADABLE_DTYPES:
                raise ModelLoadError(
                    f"{path.name}: tensor {_short(name)} has dtype {info.dtype}, which MLX cannot load"
                )
    weights: dict[str, mx.array] = {}
    for path, header in headers.items():
        try:
            loaded = mx.load(str(path), format="safetensors")
        except (RuntimeError, ValueError, OSError) as e:
            raise CorruptCheckpointError(f"{path.name}: MLX could not load it ({e})") from e
        _check_loaded(loaded, header, path.name)
        weights.update(loaded)
    return weights


def _check_loaded(loaded: Mapping[str, mx.array], header: SafetensorsHeader, fname: str) -> None:
    """Belt and braces: what MLX returned must match the header we validated."""
    if set(loaded) != set(header.tensors):
        raise CorruptCheckpointError(f"{fname}: MLX returned a different set of tensors than the header")
    for name, arr in loaded.items():
        info = header.tensors[name]
        want = _MX_FROM_ST.get(info.dtype) or _mx_dtype(info.dtype)
        if tuple(arr.shape) != info.shape or arr.dtype != want:
            raise CorruptCheckpointError(f"{fname}: tensor {_short(name)} loaded with a wrong shape or dtype")


def _mx_dtype(st_dtype: str) -> mx.Dtype | None:
    return next((d for d, s in _ST_FROM_MX.items() if s == st_dtype), None)


# -------------------------------------------------------------------------------------------- write


def safetensors_dtype(dtype: mx.Dtype) -> str:
    """The safetensors dtype code for an MLX dtype; ValueError if the format has none."""
    try:
        return _ST_FROM_MX[dtype]
    except KeyError:
        raise ValueError(f"MLX dtype {dtype} has no safetensors equivalent") from None


def build_header(
    tensors: Mapping[str, mx.array],
    names: Sequence[str],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The padded JSON header for ``names`` in that order, from shapes and dtypes only (no eval)."""
    doc: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        doc[METADATA_KEY] = dict(metadata)
    pos = 0
    for name in names:
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise ValueError(f"invalid tensor name {_short(name)}")
        arr = tensors[name]
        doc[name] = {
            "dtype": safetensors_dtype(arr.dtype),
            "shape": list(arr.shape),
            "data_offsets": [pos, pos + arr.nbytes],
        }
        pos += arr.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % _HEADER_ALIGN)


def write_safetensors(
    path: Path,
    tensors: Mapping[str, mx.array],
    metadata: Mapping[str, str] | None = None,
    *,
    names: Sequence[str] | None = None,
    on_write: Callable[[memoryview], None] | None = None,
    consume: bool = False,
    fsync: bool = True,
) -> int:
    """Stream ``tensors`` (or the subset ``names``, in that order) into a safetensors file.

    The header is built from shapes and dtypes; then each tensor is evaluated, written and dropped,
    so the writer itself holds about one tensor at a time. Evaluated arrays stay in memory while the
    caller references them: pass a dict you own with ``consume=True`` to pop each entry once written.
    ``on_write`` sees every chunk written (for hashing and progress). Returns the file size in bytes.
    Not atomic by itself: a failure leaves a partial file (``convert.save`` writes into a staging
    folder for that reason).
    """
    if consume and not isinstance(tensors, MutableMapping):
        raise TypeError("consume=True needs a mutable mapping")
    names = list(tensors) if names is None else list(names)
    header = build_header(tensors, names, metadata)
    total = 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(header)), header):
            total += _write_chunk(f, memoryview(chunk), on_write)
        for name in names:
            data = _host_bytes(tensors[name])
            written = _write_chunk(f, data, on_write)
            expected = tensors[name].nbytes
            del data
            if written != expected:  # an MLX/numpy view mismatch would corrupt the file silently
                raise RuntimeError(f"tensor {_short(name)}: wrote {written} bytes, expected {expected}")
            total += written
            if consume:
                del tensors[name]  # type: ignore[attr-defined]  # caller passed a MutableMapping
        f.flush()
        if fsync:
            fsync_fd(f.fileno())
    return total


def fsync_fd(fd: int) -> None:
    """Flush ``fd`` to stable storage. On macOS plain fsync stops at the drive's cache: use F_FULLFSYNC."""
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass  # not supported by this filesystem: fall back to fsync
    os.fsync(fd)


def _host_bytes(arr: mx.array) -> memoryview:
    """Evaluate ``arr`` and return its raw little-endian bytes, C-contiguous, as a flat view."""
    mx.eval(arr)
    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)  # numpy has no bfloat16; the bytes are the same
    host = np.ascontiguousarray(np.asarray(arr))  # zero-copy unless arr is strided
    return memoryview(host).cast("B") if host.size else memoryview(b"")


def _write_chunk(f, chunk: memoryview, on_write: Callable[[memoryview], None] | None) -> int:
    f.write(chunk)
    if on_write is not None:
        on_write(chunk)
    return chunk.nbytes
