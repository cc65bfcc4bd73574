"""C3: hostile safetensors files and indexes are rejected by our own checks, before any tensor data
is read, with a CorruptCheckpointError naming the file; plus the streaming writer's contract."""

from __future__ import annotations

import builtins
import json
import struct
from pathlib import Path
from types import MappingProxyType

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file

import mlxserve.io.safetensors as st
from mlxserve.errors import CorruptCheckpointError, ModelLoadError
from mlxserve.io.safetensors import (
    TensorInfo,
    load_tensors,
    read_header,
    validate_index,
    write_safetensors,
)


def _header_bytes(header: object) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_raw(path: Path, header: object, data: bytes = b"", *, declared_len: int | None = None) -> Path:
    """A safetensors file from a raw header (dict or bytes) and data, with an optional lying length."""
    raw = _header_bytes(header)
    n = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def entry(dtype: object = "F32", shape: object = (4,), offsets: object = (0, 16)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


# (case id, header, data bytes, declared header length or None, expected message after "bad.safetensors: ")
HOSTILE_CASES = [
    ("header-len-zero", b"{}", b"", 0, "header length is 0"),
    ("header-len-huge", b"{}", b"", 100_000_001, "header length 100000001 exceeds the 100000000-byte limit"),
    ("header-len-past-eof", b"{}", b"", 4096, "header length 4096 runs past the end of the file (16 bytes)"),
    ("not-utf8", b'{"\xff\xfe": 1}', b"", None, "header is not valid UTF-8 (byte 2)"),
    ("not-json", b'{"a": ', b"", None, "header is not valid JSON (line 1 column 9: Expecting value)"),
    ("json-list", b"[1, 2]", b"", None, "header must be a JSON object, got list"),
    ("json-string", b'"abc"', b"", None, "header must be a JSON object, got str"),
    ("duplicate-name", b'{"a": 1, "a": 2}', b"", None, "duplicate key 'a' in header"),
    ("entry-not-object", {"a": 5}, b"", None,
     "tensor 'a' must be an object with 'dtype', 'shape' and 'data_offsets'"),
    ("entry-missing-offsets", {"a": {"dtype": "F32", "shape": [4]}}, b"", None,
     "tensor 'a' must be an object with 'dtype', 'shape' and 'data_offsets'"),
    ("unknown-dtype", {"a": entry(dtype="F128")}, bytes(16), None, "tensor 'a' has unknown dtype 'F128'"),
    ("sub-byte-dtype", {"a": entry(dtype="F4")}, bytes(16), None, "tensor 'a' has unknown dtype 'F4'"),
    ("dtype-not-string", {"a": entry(dtype=5)}, bytes(16), None, "tensor 'a' has unknown dtype 5"),
    ("negative-dim", {"a": entry(shape=(-4,))}, bytes(16), None,
     "tensor 'a' has invalid shape [-4]: dimensions must be non-negative integers"),
    ("float-dim", {"a": entry(shape=[4.0])}, bytes(16), None,
     "tensor 'a' has invalid shape [4.0]: dimensions must be non-negative integers"),
    ("bool-dim", {"a": entry(shape=[True])}, bytes(16), None,
     "tensor 'a' has invalid shape [True]: dimensions must be non-negative integers"),
    ("shape-not-list", {"a": entry(shape="4")}, bytes(16), None,
     "tensor 'a' has invalid shape '4': dimensions must be non-negative integers"),
    ("too-many-dims", {"a": entry(shape=[1] * 65, offsets=(0, 4))}, bytes(4), None,
     "tensor 'a' has 65 dimensions, more than 64"),
    ("huge-int-literal", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
     bytes(4), None, "header is not valid JSON (Exceeds the limit (4300 digits)"),
    ("offsets-one-int", {"a": entry(offsets=[0])}, bytes(16), None,
     "tensor 'a' has invalid data_offsets [0]: need two non-negative integers"),
    ("offsets-negative", {"a": entry(offsets=(-16, 0))}, bytes(16), None,
     "tensor 'a' has invalid data_offsets [-16, 0]: need two non-negative integers"),
    ("offsets-strings", {"a": entry(offsets=["0", "16"])}, bytes(16), None,
     "tensor 'a' has invalid data_offsets ['0', '16']: need two non-negative integers"),
    ("begin-after-end", {"a": entry(offsets=(16, 0))}, bytes(16), None,
     "tensor 'a' has data_offsets [16, 0] with begin > end"),
    ("end-past-data", {"a": entry(shape=(8,), offsets=(0, 32))}, bytes(16), None,
     "tensor 'a' ends at byte 32 but the data section holds 16 bytes"),
    ("size-mismatch", {"a": entry(shape=(3,), offsets=(0, 16))}, bytes(16), None,
     "tensor 'a' spans 16 bytes but shape [3] of F32 needs 12"),
    ("overlap", {"a": entry(offsets=(0, 16)), "b": entry(shape=(2,), offsets=(8, 16))}, bytes(16), None,
     "tensor 'b' overlaps tensor 'a'"),
    ("hole", {"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(16, 24))},
     bytes(24), None, "8 unused bytes before tensor 'b' (hole in the data section)"),
    ("trailing-bytes", {"a": entry(shape=(2,), offsets=(0, 8))}, bytes(16), None,
     "8 trailing bytes after the last tensor"),
    ("empty-name", {"": entry()}, bytes(16), None, "empty tensor name"),
    ("overlong-name", {"w" * 1025: entry()}, bytes(16), None,
     "tensor name of 1025 characters exceeds the 1024-character limit"),
    ("control-char-name", {"a\nINFO forged": entry()}, bytes(16), None,
     "tensor name 'a\\nINFO forged' has control characters"),
    ("metadata-int-value", {"__metadata__": {"format": 1}, "a": entry()}, bytes(16), None,
     "__metadata__ must map strings to strings"),
    ("metadata-list", {"__metadata__": ["x"], "a": entry()}, bytes(16), None,
     "__metadata__ must map strings to strings"),
    ("deep-nesting", b"[" * 200_000 + b"]" * 200_000, b"", None, "header JSON is nested too deeply"),
]


class ReadTracker:
    """Wraps open() in the module under test and records the furthest byte offset read."""

    def __init__(self) -> None:
        self.max_pos = 0

    def open(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        tracker = self
        real_read = f.read

        class Tracked:
            def __getattr__(self, name):
                return getattr(f, name)

            def read(self, n=-1):
                data = real_read(n)
                tracker.max_pos = max(tracker.max_pos, f.tell())
                return data

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Tracked()


@pytest.mark.parametrize(
    "header, data, declared_len, expected",
    [case[1:] for case in HOSTILE_CASES],
    ids=[case[0] for case in HOSTILE_CASES],
)
def test_hostile_header_is_rejected_before_data(tmp_path, monkeypatch, header, data, declared_len, expected):
    path = write_raw(tmp_path / "bad.safetensors", header, data, declared_len=declared_len)
    tracker = ReadTracker()
    monkeypatch.setattr(st, "open", tracker.open, raising=False)
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert type(info.value) is CorruptCheckpointError
    message = str(info.value)
    assert message.startswith("bad.safetensors: " + expected), message
    assert str(tmp_path) not in message
    header_end = 8 + len(_header_bytes(header))
    assert tracker.max_pos <= header_end  # not one byte of the data section was read


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert str(info.value) == "tiny.safetensors: file is 3 bytes, shorter than the 8-byte header length prefix"


def test_missing_file(tmp_path):
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(tmp_path / "gone.safetensors")
    assert str(info.value) == "gone.safetensors: cannot read file (No such file or directory)"


def test_valid_header_is_parsed_exactly(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "b": entry(dtype="BF16", shape=(2, 3), offsets=(16, 28)),
        "a": entry(dtype="F32", shape=(4,), offsets=(0, 16)),
        "empty": entry(dtype="I8", shape=(0, 5), offsets=(28, 28)),
        "scalar": entry(dtype="U8", shape=(), offsets=(28, 29)),
    }
    path = write_raw(tmp_path / "ok.safetensors", header, bytes(29))
    parsed = read_header(path)
    assert dict(parsed.metadata) == {"format": "pt"}
    assert parsed.data_offset == 8 + len(_header_bytes(header))
    assert dict(parsed.tensors) == {
        "b": TensorInfo(dtype="BF16", shape=(2, 3), begin=16, end=28),
        "a": TensorInfo(dtype="F32", shape=(4,), begin=0, end=16),
        "empty": TensorInfo(dtype="I8", shape=(0, 5), begin=28, end=28),
        "scalar": TensorInfo(dtype="U8", shape=(), begin=28, end=29),
    }


def test_reference_writer_output_is_accepted(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.arange(6, dtype=np.int64).reshape(2, 3), "y": np.ones(3, np.float16)},
              str(tmp_path / "ref.safetensors"), metadata={"format": "np"})
    parsed = read_header(tmp_path / "ref.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in parsed.tensors.items()} == {
        "x": ("I64", (2, 3)), "y": ("F16", (3,)),
    }


# ----------------------------------------------------------------------------------------- index


def _shard(folder: Path, name: str, tensor_names: list[str]) -> None:
    header = {t: entry(shape=(1,), offsets=(4 * i, 4 * i + 4)) for i, t in enumerate(tensor_names)}
    write_raw(folder / name, header, bytes(4 * len(tensor_names)))


def _index(folder: Path, weight_map: object, name: str = "model.safetensors.index.json") -> None:
    (folder / name).write_text(json.dumps({"metadata": {"total_size": 8}, "weight_map": weight_map}))


def test_valid_index(tmp_path):
    _shard(tmp_path, "s1.safetensors", ["a", "b"])
    _shard(tmp_path, "s2.safetensors", ["c"])
    _index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"})
    assert validate_index(tmp_path) == {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}


@pytest.mark.parametrize(
    "shard_name, expected",
    [
        ("../evil.safetensors", "shard name '../evil.safetensors' is not a plain file name in the model folder"),
        ("/etc/evil.safetensors", "shard name '/etc/evil.safetensors' is not a plain file name in the model folder"),
        ("sub/x.safetensors", "shard name 'sub/x.safetensors' is not a plain file name in the model folder"),
        ("..", "shard name '..' is not a plain file name in the model folder"),
        ("a\\..\\b.safetensors", "shard name 'a\\\\..\\\\b.safetensors' is not a plain file name in the model folder"),
        ("pytorch_model.bin", "shard 'pytorch_model.bin' is not a .safetensors file"),
    ],
)
def test_index_shard_name_must_be_plain(tmp_path, shard_name, expected):
    outside = tmp_path.parent / "evil.safetensors"
    _index(tmp_path, {"a": shard_name})
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == "model.safetensors.index.json: " + expected
    assert not outside.exists()


def test_index_missing_shard(tmp_path):
    _shard(tmp_path, "model-00001-of-00002.safetensors", ["a"])
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == (
        "model.safetensors.index.json: shard 'model-00002-of-00002.safetensors' is missing"
    )


def test_index_tensor_missing_from_shard(tmp_path):
    _shard(tmp_path, "s1.safetensors", ["a"])
    _index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == (
        "model.safetensors.index.json: tensor 'b' is listed under s1.safetensors but s1.safetensors lacks it"
    )


def test_shard_tensor_not_in_index(tmp_path):
    _shard(tmp_path, "s1.safetensors", ["a", "extra"])
    _index(tmp_path, {"a": "s1.safetensors"})
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == (
        "model.safetensors.index.json: tensor 'extra' in s1.safetensors is not listed in the index"
    )


def test_tensor_stored_in_another_shard_than_indexed(tmp_path):
    _shard(tmp_path, "s1.safetensors", ["a"])
    _shard(tmp_path, "s2.safetensors", ["b", "a2"])
    _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "a2": "s1.safetensors"})
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == (
        "model.safetensors.index.json: tensor 'a2' is listed under s1.safetensors but stored in s2.safetensors"
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{", "not valid UTF-8 JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ("[]", "must be a JSON object with a 'weight_map' object"),
        ('{"weight_map": []}', "must be a JSON object with a 'weight_map' object"),
        ('{"weight_map": {"a": 1}}', "'weight_map' must map tensor names to shard file names"),
        ('{"weight_map": {}}', "'weight_map' is empty"),
        ('{"metadata": 3, "weight_map": {"a": "s.safetensors"}}', "'metadata' must be an object"),
    ],
)
def test_malformed_index(tmp_path, content, expected):
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == "model.safetensors.index.json: " + expected


def test_index_pointing_at_hostile_shard(tmp_path):
    write_raw(tmp_path / "s1.safetensors", {"a": entry(offsets=(0, 16))}, bytes(8))
    _index(tmp_path, {"a": "s1.safetensors"})
    with pytest.raises(CorruptCheckpointError) as info:
        validate_index(tmp_path)
    assert str(info.value) == "s1.safetensors: tensor 'a' ends at byte 16 but the data section holds 8 bytes"


# ------------------------------------------------------------------------------------------ load


def test_load_tensors_validates_before_mlx(tmp_path, monkeypatch):
    good = write_raw(tmp_path / "good.safetensors", {"a": entry()}, np.arange(4, dtype=np.float32).tobytes())
    bad = write_raw(tmp_path / "bad.safetensors", {"b": entry(offsets=(0, 16))}, bytes(4))

    def fail(*args, **kwargs):
        raise AssertionError("mx.load must not be reached")

    monkeypatch.setattr(st.mx, "load", fail)
    with pytest.raises(CorruptCheckpointError) as info:
        load_tensors([good, bad])
    assert str(info.value) == "bad.safetensors: tensor 'b' ends at byte 16 but the data section holds 4 bytes"


def test_load_tensors_duplicate_across_shards(tmp_path):
    one = write_raw(tmp_path / "one.safetensors", {"a": entry()}, bytes(16))
    two = write_raw(tmp_path / "two.safetensors", {"a": entry()}, bytes(16))
    with pytest.raises(CorruptCheckpointError) as info:
        load_tensors([one, two])
    assert str(info.value) == "tensor 'a' is stored in both one.safetensors and two.safetensors"


def test_load_tensors_refuses_dtype_mlx_cannot_load(tmp_path):
    path = write_raw(tmp_path / "f64.safetensors", {"a": entry(dtype="F64", shape=(2,))}, bytes(16))
    with pytest.raises(ModelLoadError) as info:
        load_tensors([path])
    assert type(info.value) is ModelLoadError
    assert str(info.value) == "f64.safetensors: tensor 'a' has dtype F64, which MLX cannot load"


def test_load_tensors_is_lazy(tmp_path):
    """mx.load reads tensor data on eval, not on load: documents the property load_tensors relies on."""
    path = write_raw(tmp_path / "w.safetensors", {"a": entry()}, np.zeros(4, np.float32).tobytes())
    weights = load_tensors([path])
    with open(path, "r+b") as f:
        f.seek(read_header(path).data_offset)
        f.write(np.full(4, 7.0, np.float32).tobytes())
    assert weights["a"].tolist() == [7.0, 7.0, 7.0, 7.0]


# ----------------------------------------------------------------------------------------- write

WRITE_DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.uint32, mx.int32, mx.uint8, mx.int8, mx.bool_,
                mx.int16, mx.uint16, mx.int64, mx.uint64]


def _sample(dtype: mx.Dtype, shape: tuple[int, ...] = (3, 5)) -> mx.array:
    base = mx.arange(int(np.prod(shape)), dtype=mx.float32).reshape(shape)
    if dtype == mx.bool_:
        return (base % 2) == 0
    return base.astype(dtype)


def test_write_round_trip_all_dtypes(tmp_path):
    tensors = {f"t.{d}": _sample(d) for d in WRITE_DTYPES}
    tensors["strided"] = mx.arange(12, dtype=mx.float32).reshape(3, 4).T  # non-contiguous view
    tensors["scalar"] = mx.array(2.5)
    tensors["empty"] = mx.zeros((0, 4), dtype=mx.bfloat16)
    path = tmp_path / "w.safetensors"
    size = write_safetensors(path, tensors, {"format": "mlx"})
    assert size == path.stat().st_size
    header = read_header(path)
    assert header.data_offset % 8 == 0
    assert dict(header.metadata) == {"format": "mlx"}
    assert list(header.tensors) == list(tensors)
    loaded = mx.load(str(path))
    for name, arr in tensors.items():
        assert loaded[name].dtype == arr.dtype, name
        assert loaded[name].shape == arr.shape, name
        assert mx.array_equal(loaded[name], arr).item(), name
    # The reference reader agrees (numpy has no bfloat16, so it reads a file without those).
    numpy_path = tmp_path / "np.safetensors"
    plain = {k: v for k, v in tensors.items() if v.dtype != mx.bfloat16}
    write_safetensors(numpy_path, plain)
    ref = np_load_file(str(numpy_path))
    assert sorted(ref) == sorted(plain)
    for name, arr in plain.items():
        assert ref[name].dtype == np.asarray(arr).dtype, name
        assert np.array_equal(ref[name], np.asarray(arr)), name


def test_write_is_streaming_with_consume(tmp_path):
    """With consume=True at most about one evaluated tensor is alive at a time."""
    tensor_bytes = 1024 * 1024 * 4
    tensors = {f"t{i}": mx.full((1024, 1024), i, dtype=mx.float32) * 2 for i in range(8)}
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    write_safetensors(tmp_path / "s.safetensors", tensors, consume=True)
    assert tensors == {}
    assert mx.get_peak_memory() - before <= tensor_bytes + 64 * 1024
    loaded = mx.load(str(tmp_path / "s.safetensors"))
    assert [loaded[f"t{i}"][0, 0].item() for i in range(8)] == [0, 2, 4, 6, 8, 10, 12, 14]


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError) as info:
        write_safetensors(tmp_path / "x.safetensors", {"a": mx.zeros(2)}, {"k": 1})
    assert str(info.value) == "safetensors metadata must map str to str"
    with pytest.raises(TypeError) as info:
        write_safetensors(tmp_path / "x.safetensors", MappingProxyType({"a": mx.zeros(2)}), consume=True)
    assert str(info.value) == "consume=True needs a mutable mapping"
    with pytest.raises(ValueError) as info:
        write_safetensors(tmp_path / "x.safetensors", {"__metadata__": mx.zeros(2)})
    assert str(info.value) == "invalid tensor name '__metadata__'"
