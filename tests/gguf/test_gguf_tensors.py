"""Q4_0 / Q4_1 / Q8_0 become MLX affine quantization with exactly the same float32 weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from _gguf_builder import llama_cpp_permute
from gguf import GGMLQuantizationType as T
from gguf import quants
from mlxserve.convert.gguf.tensors import repack_blocks, unpermute_rows

LOSSLESS = [(T.Q4_0, 4), (T.Q4_1, 4), (T.Q8_0, 8)]


def random_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Mixed magnitudes per row, and one constant block, so scales and offsets vary widely.
    w = rng.normal(0, 1, (rows, cols)) * rng.uniform(0.01, 3.0, (rows, 1)) + rng.normal(0, 0.5, (rows, 1))
    w[0, :32] = 0.25
    return w.astype(np.float32)


def mlx_values(packed) -> np.ndarray:
    w = mx.dequantize(
        mx.array(packed.weight), mx.array(packed.scales), mx.array(packed.biases),
        group_size=packed.group_size, bits=packed.bits,
    )
    return np.array(w)


@pytest.mark.parametrize(("qtype", "bits"), LOSSLESS, ids=lambda x: getattr(x, "name", x))
def test_repacked_blocks_dequantize_bitwise_equal(qtype, bits):
    w = random_weights(48, 256, seed=int(qtype))
    raw = quants.quantize(w, qtype)
    reference = quants.dequantize(raw, qtype)
    packed = repack_blocks(raw, int(qtype), rows=48)
    assert packed.bits == bits and packed.group_size == 32
    assert packed.weight.dtype == np.uint32 and packed.weight.shape == (48, 256 * bits // 32)
    assert packed.scales.shape == packed.biases.shape == (48, 8)
    ours = mlx_values(packed)
    assert ours.dtype == np.float32
    # Exactly equal; only the sign of zero may differ (d * (q - 8) vs d * q - 8d at q = 8, d < 0).
    assert np.array_equal(ours, reference)
    assert np.array_equal(np.abs(ours).view(np.uint32), np.abs(reference).view(np.uint32))


@pytest.mark.parametrize(("qtype", "bits"), LOSSLESS, ids=lambda x: getattr(x, "name", x))
def test_scales_and_biases_are_exact_in_float16(qtype, bits):
    raw = quants.quantize(random_weights(16, 64, seed=3), qtype)
    packed = repack_blocks(raw, int(qtype), rows=16)
    for values in (packed.scales, packed.biases):
        assert np.array_equal(values.astype(np.float16).astype(np.float32), values)
    assert packed.fits_float16()


def test_fp16_overflow_is_detected():
    """Q8_0's bias is -128 d: a block scale above 511.75 cannot be stored as a float16 bias."""
    raw = quants.quantize(np.full((1, 32), 100_000.0, dtype=np.float32), T.Q8_0)
    packed = repack_blocks(raw, int(T.Q8_0), rows=1)
    assert not packed.fits_float16()
    assert np.array_equal(mlx_values(packed), quants.dequantize(raw, T.Q8_0))


@pytest.mark.parametrize(("heads", "rows"), [(4, 64), (2, 32), (9, 576), (3, 192)])
def test_unpermute_inverts_llama_cpp_permute(heads, rows):
    original = np.arange(rows)
    assert np.array_equal(llama_cpp_permute(original, heads)[unpermute_rows(rows, heads)], original)


def test_unpermute_order_for_one_head():
    # head_dim 8: GGUF rows hold 0, 4, 1, 5, 2, 6, 3, 7 (interleaved halves).
    assert unpermute_rows(8, 1).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize(("qtype", "bits"), LOSSLESS, ids=lambda x: getattr(x, "name", x))
def test_permuted_quantized_rows_stay_lossless(qtype, bits):
    """llama q/k: quantize the permuted GGUF layout, repack, reorder rows -> exactly the HF rows."""
    heads, rows = 4, 64
    w_hf = random_weights(rows, 128, seed=11)
    raw = quants.quantize(llama_cpp_permute(w_hf, heads), qtype)
    order = unpermute_rows(rows, heads)
    packed = repack_blocks(raw, int(qtype), rows=rows).take_rows(order)
    expected = quants.dequantize(raw, qtype)[order]
    assert np.array_equal(mlx_values(packed), expected)
    # and the row order is the HF one: each row is the round trip of the same HF row
    assert np.abs(mlx_values(packed) - w_hf).max() < np.abs(w_hf).max() * (0.2 if bits == 4 else 0.02)
