"""The GGUF reader refuses hostile files quickly, with small memory and a one-line message."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from _gguf_builder import gguf_string, raw_gguf, raw_kv_u32, raw_tensor_info
from mlxserve.convert.gguf.reader import read_gguf

from mlxserve.errors import CorruptCheckpointError, UnsupportedModelError

F32, Q4_0 = 0, 2
ARCH = gguf_string("general.architecture") + (8).to_bytes(4, "little") + gguf_string("llama")


def valid_bytes() -> bytes:
    """Two tensors: 'a' F32 (2, 32), 'b' Q4_0 (1, 32), each at an aligned offset."""
    a = np.arange(64, dtype=np.float32).tobytes()  # 256 bytes
    b = bytes(18)  # one Q4_0 block
    infos = [raw_tensor_info("a", (32, 2), F32, 0), raw_tensor_info("b", (32, 1), Q4_0, 256)]
    return raw_gguf([ARCH, raw_kv_u32("x.count", 7)], infos, a + b)


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_valid_file_parses(tmp_path):
    gf = read_gguf(write(tmp_path, valid_bytes()))
    assert gf.version == 3
    assert dict(gf.metadata) == {"general.architecture": "llama", "x.count": 7}
    assert gf.tensors["a"].shape == (2, 32) and gf.tensors["a"].nbytes == 256
    assert gf.tensors["b"].shape == (1, 32) and gf.tensors["b"].nbytes == 18
    assert gf.tensors["b"].offset - gf.tensors["a"].offset == 256
    assert np.array_equal(gf.tensor_bytes("a").view(np.float32).reshape(-1), np.arange(64, dtype=np.float32))


def _huge(n: int) -> bytes:
    return n.to_bytes(8, "little")


HOSTILE = {
    "bad magic": (lambda: b"GGUX" + valid_bytes()[4:], "not a GGUF file (magic b'GGUX'"),
    "empty file": (lambda: b"", "not a GGUF file (only 0 bytes)"),
    "truncated header": (lambda: valid_bytes()[:20], "not a GGUF file (only 20 bytes)"),
    "unknown version": (lambda: raw_gguf([ARCH], [], version=7), "unknown GGUF version 7"),
    "absurd kv count": (lambda: raw_gguf([ARCH], [], n_kv=2**40), f"metadata count {2**40} exceeds the limit"),
    "kv count beyond the file": (lambda: raw_gguf([ARCH], [], n_kv=50_000), "50000 metadata entries and 0 tensors cannot fit"),
    "absurd tensor count": (lambda: raw_gguf([ARCH], [], n_tensors=2**33), f"tensor count {2**33} exceeds the limit"),
    "absurd key length": (lambda: raw_gguf([_huge(2**62) + b"abc"], []), f"metadata key is {2**62} bytes long"),
    "absurd string length": (
        lambda: raw_gguf([gguf_string("k") + (8).to_bytes(4, "little") + _huge(2**60)], []),
        "truncated value of 'k'",
    ),
    "absurd array length": (
        lambda: raw_gguf([gguf_string("k") + (9).to_bytes(4, "little") + (4).to_bytes(4, "little") + _huge(2**61)], []),
        f"array 'k' claims {2**61} elements, more than the file can hold",
    ),
    "absurd string array length": (
        lambda: raw_gguf([gguf_string("k") + (9).to_bytes(4, "little") + (8).to_bytes(4, "little") + _huge(2**40)], []),
        f"array 'k' claims {2**40} elements",
    ),
    "unknown value type": (lambda: raw_gguf([gguf_string("k") + (77).to_bytes(4, "little")], []), "metadata 'k' has unknown value type 77"),
    "invalid utf-8 key": (lambda: raw_gguf([gguf_string(b"\xff\xfe")], []), "metadata key at byte 32 is not valid UTF-8"),
    "duplicate key": (lambda: raw_gguf([ARCH, ARCH], []), "duplicate metadata key 'general.architecture'"),
    "bad alignment": (lambda: raw_gguf([raw_kv_u32("general.alignment", 24)], []), "general.alignment must be a power of two"),
    "tensor offset out of range": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (32, 2), F32, 2**40)], bytes(256)),
        "tensor 'w' data (256 bytes at offset 1099511627776) runs past the end of the file",
    ),
    "truncated tensor data": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (32, 2), F32, 0)], bytes(255)),
        "tensor 'w' data (256 bytes at offset 0) runs past the end of the file (data section is 255 bytes)",
    ),
    "misaligned offset": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (32, 1), F32, 4)], bytes(256)),
        "tensor 'w' offset 4 is not aligned to 32",
    ),
    "unknown tensor type": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (32, 1), 999, 0)], bytes(128)),
        "tensor 'w' has unknown ggml type 999",
    ),
    "too many dims": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (1, 1, 1, 1, 32), F32, 0)], bytes(128)),
        "tensor 'w' has 5 dimensions (1 to 4 allowed)",
    ),
    "zero dim": (lambda: raw_gguf([ARCH], [raw_tensor_info("w", (32, 0), F32, 0)]), "tensor 'w' has an empty dimension [32, 0]"),
    "absurd element count": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (2**32, 2**32), F32, 0)]),
        f"tensor 'w' has {2**64} elements",
    ),
    "row not a block multiple": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("w", (48, 1), Q4_0, 0)], bytes(64)),
        "tensor 'w': row length 48 is not a multiple of the Q4_0 block (32)",
    ),
    "overlapping tensors": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("a", (32, 2), F32, 0), raw_tensor_info("b", (32, 1), F32, 128)], bytes(512)),
        "tensors 'a' and 'b' overlap",
    ),
    "duplicate tensor": (
        lambda: raw_gguf([ARCH], [raw_tensor_info("a", (32,), F32, 0), raw_tensor_info("a", (32,), F32, 128)], bytes(256)),
        "duplicate tensor name 'a'",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused_quickly_and_cheaply(tmp_path, case):
    make, message = HOSTILE[case]
    path = write(tmp_path, make(), name="hostile.gguf")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CorruptCheckpointError) as info:
            read_gguf(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 1 * 2**20, f"peak {peak} bytes"
    text = str(info.value)
    assert text.startswith("hostile.gguf: ") and message in text
    assert "\n" not in text and str(tmp_path) not in text  # one line, base name only


def test_big_endian_or_v1_is_unsupported_not_corrupt(tmp_path):
    big_endian = raw_gguf([ARCH], [], version=int.from_bytes((3).to_bytes(4, "big"), "little"))
    with pytest.raises(UnsupportedModelError, match="big-endian"):
        read_gguf(write(tmp_path, big_endian))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorruptCheckpointError, match="^nope.gguf: cannot open GGUF file"):
        read_gguf(tmp_path / "nope.gguf")


def test_file_truncated_after_validation_is_detected(tmp_path):
    path = write(tmp_path, valid_bytes())
    gf = read_gguf(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="tensor 'b' is truncated"):
        gf.tensor_bytes("b")
