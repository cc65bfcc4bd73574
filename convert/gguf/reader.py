"""Validated GGUF reading: header, metadata and tensor table, checked before any large allocation.

File layout (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   [string key | u32 value_type | value]
    tensor_count x [string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset]
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset (offset aligned)

    string = u64 length + UTF-8 bytes; array = u32 element type + u64 count + elements

Every count and length is checked against the bytes left in the file before anything is allocated
for it, so a hostile file costs at most its own size. Any defect raises ``CorruptCheckpointError``
with a one-line message naming the file's base name only.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mlxserve.errors import CorruptCheckpointError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_KV_COUNT = 1_000_000
MAX_TENSOR_COUNT = 100_000
MAX_KEY_BYTES = 65_535  # the spec's limit on key length
MAX_TENSOR_NAME_BYTES = 1024  # ggml uses 64; some tools write longer names
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 44  # far above any real tensor; keeps byte sizes exact in Python ints
MAX_ARRAY_DEPTH = 3
DEFAULT_ALIGNMENT = 32
_FIXED_HEADER = struct.Struct("<4sIQQ")
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

# GGUF value type -> (struct format, byte size) for scalars; 8 = string, 9 = array.
_SCALARS: Mapping[int, tuple[str, int]] = MappingProxyType({
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
})
_NUMPY_OF: Mapping[int, str] = MappingProxyType({
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
    10: "<u8", 11: "<i8", 12: "<f8",
})
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One tensor table entry.

    shape: PyTorch/HF order (outermost first), i.e. GGUF's ``dims`` reversed; a GGUF ``[576, 192]``
    (ne0 = 576 inputs per row) is a ``(192, 576)`` weight. offset: absolute byte offset in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=object))


@dataclass(frozen=True)
class GGUFFile:
    """A validated GGUF file: metadata values (str, int, float, bool or lists) and the tensor table."""

    path: Path
    version: int
    metadata: Mapping[str, Any]
    tensors: Mapping[str, GGUFTensorInfo]
    alignment: int
    data_offset: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor, read now (uint8, shape (rows, bytes_per_row))."""
        info = self.tensors[name]
        try:
            with open(self.path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.nbytes)
        except OSError as e:
            raise CorruptCheckpointError(f"{self.path.name}: cannot read tensor {name!r}: {e.strerror or e}") from None
        if len(raw) != info.nbytes:
            raise CorruptCheckpointError(f"{self.path.name}: tensor {name!r} is truncated (the file changed while reading)")
        rows = int(np.prod(info.shape[:-1], dtype=object)) if len(info.shape) > 1 else 1
        return np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate ``path``'s header, metadata and tensor table (tensor data is not read)."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path.name}: cannot open GGUF file: {e.strerror or e}") from None
    if size < _FIXED_HEADER.size:
        raise CorruptCheckpointError(f"{path.name}: not a GGUF file (only {size} bytes)")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _Parser(mm, path.name, size).parse_file(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path.name}: cannot read GGUF file: {e.strerror or e}") from None


class _Parser:
    """A bounds-checked cursor over the mapped file."""

    def __init__(self, buf: mmap.mmap, fname: str, size: int) -> None:
        self.buf, self.fname, self.size, self.pos = buf, fname, size, 0

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.fname}: {message}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated {what} at byte {self.pos} (needs {n} bytes, {self.size - self.pos} left)")

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str, max_bytes: int | None = None) -> str:
        length = self.unpack("<Q", 8, f"{what} length")
        if max_bytes is not None and length > max_bytes:
            raise self.fail(f"{what} is {length} bytes long (limit {max_bytes})")
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - length} is not valid UTF-8") from None

    # ---- header ----------------------------------------------------------------------------------

    def parse_file(self, path: Path) -> GGUFFile:
        magic, version, n_tensors, n_kv = _FIXED_HEADER.unpack_from(self.buf, 0)
        self.pos = _FIXED_HEADER.size
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        if version not in SUPPORTED_VERSIONS:
            if version == 1 or struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
                raise UnsupportedModelError(f"{self.fname}: GGUF version 1 and big-endian GGUF files are not supported")
            raise self.fail(f"unknown GGUF version {version} (supported: 2, 3)")
        self._check_counts(n_tensors, n_kv)
        metadata = self._metadata(n_kv)
        alignment = _alignment(metadata, self)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self._place_tensors(infos, data_offset, alignment)
        return GGUFFile(
            path=path, version=version, metadata=MappingProxyType(metadata),
            tensors=MappingProxyType(tensors), alignment=alignment, data_offset=data_offset,
        )

    def _check_counts(self, n_tensors: int, n_kv: int) -> None:
        if n_kv > MAX_KV_COUNT:
            raise self.fail(f"metadata count {n_kv} exceeds the limit of {MAX_KV_COUNT}")
        if n_tensors > MAX_TENSOR_COUNT:
            raise self.fail(f"tensor count {n_tensors} exceeds the limit of {MAX_TENSOR_COUNT}")
        needed = n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES
        if needed > self.size - self.pos:
            raise self.fail(
                f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in a {self.size}-byte file"
            )

    # ---- metadata --------------------------------------------------------------------------------

    def _metadata(self, n_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string("metadata key", MAX_KEY_BYTES)
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}")
            value_type = self.unpack("<I", 4, f"type of {key!r}")
            metadata[key] = self._value(value_type, key, depth=0)
        return metadata

    def _value(self, value_type: int, key: str, depth: int) -> Any:
        if value_type in _SCALARS:
            fmt, n = _SCALARS[value_type]
            value = self.unpack(fmt, n, f"value of {key!r}")
            return bool(value) if value_type == _BOOL else value
        if value_type == _STRING:
            return self.string(f"value of {key!r}")
        if value_type == _ARRAY:
            return self._array(key, depth)
        raise self.fail(f"metadata {key!r} has unknown value type {value_type}")

    def _array(self, key: str, depth: int) -> list:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"metadata {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        elem_type = self.unpack("<I", 4, f"array type of {key!r}")
        count = self.unpack("<Q", 8, f"array length of {key!r}")
        min_size = _min_value_size(elem_type)
        if min_size is None:
            raise self.fail(f"metadata {key!r} is an array of unknown value type {elem_type}")
        if count * min_size > self.size - self.pos:
            raise self.fail(f"array {key!r} claims {count} elements, more than the file can hold")
        if elem_type in _NUMPY_OF:
            n = count * min_size
            values = np.frombuffer(self.buf, dtype=_NUMPY_OF[elem_type], count=count, offset=self.pos)
            self.pos += n
            return [bool(v) for v in values] if elem_type == _BOOL else values.tolist()
        return [self._value(elem_type, key, depth + 1) for _ in range(count)]

    # ---- tensors ---------------------------------------------------------------------------------

    def _tensor_info(self) -> GGUFTensorInfo:
        name = self.string("tensor name", MAX_TENSOR_NAME_BYTES)
        n_dims = self.unpack("<I", 4, f"rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        self.need(8 * n_dims, f"dimensions of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        ggml_type = self.unpack("<I", 4, f"type of tensor {name!r}")
        offset = self.unpack("<Q", 8, f"offset of tensor {name!r}")
        if any(d == 0 for d in dims):
            raise self.fail(f"tensor {name!r} has an empty dimension {list(dims)}")
        num_elements = 1
        for d in dims:
            num_elements *= d
        if num_elements > MAX_ELEMENTS:
            raise self.fail(f"tensor {name!r} has {num_elements} elements (limit {MAX_ELEMENTS})")
        if ggml_type not in _KNOWN_TYPES:
            raise self.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        if dims[0] % block_size:
            kind = GGMLQuantizationType(ggml_type).name
            raise self.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {kind} block ({block_size})")
        nbytes = num_elements // block_size * type_size
        return GGUFTensorInfo(name=name, shape=tuple(reversed(dims)), ggml_type=ggml_type, offset=offset, nbytes=nbytes)

    def _place_tensors(self, infos: list[GGUFTensorInfo], data_offset: int, alignment: int) -> dict:
        """Make offsets absolute; check alignment, bounds and that no two tensors overlap."""
        tensors: dict[str, GGUFTensorInfo] = {}
        for info in infos:
            if info.name in tensors:
                raise self.fail(f"duplicate tensor name {info.name!r}")
            if info.offset % alignment:
                raise self.fail(f"tensor {info.name!r} offset {info.offset} is not aligned to {alignment}")
            start = data_offset + info.offset
            if start + info.nbytes > self.size:
                raise self.fail(
                    f"tensor {info.name!r} data ({info.nbytes} bytes at offset {info.offset}) "
                    f"runs past the end of the file (data section is {max(self.size - data_offset, 0)} bytes)"
                )
            tensors[info.name] = GGUFTensorInfo(
                name=info.name, shape=info.shape, ggml_type=info.ggml_type, offset=start, nbytes=info.nbytes
            )
        ordered = sorted(tensors.values(), key=lambda t: t.offset)
        for prev, cur in itertools.pairwise(ordered):
            if cur.offset < prev.offset + prev.nbytes:
                raise self.fail(f"tensors {prev.name!r} and {cur.name!r} overlap")
        return tensors


_KNOWN_TYPES = frozenset(int(t) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES)


def _min_value_size(value_type: int) -> int | None:
    if value_type in _SCALARS:
        return _SCALARS[value_type][1]
    if value_type == _STRING:
        return 8
    if value_type == _ARRAY:
        return 12
    return None


def _alignment(metadata: Mapping[str, Any], parser: _Parser) -> int:
    value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1) or value > 1 << 20:
        raise parser.fail(f"general.alignment must be a power of two up to 1 MiB, not {value!r}")
    return value
