"""GGUF tensor data -> float arrays, or -> MLX affine quantization without loss.

Three GGUF block formats are MLX affine quantization with group size 32 in another byte order:

    Q4_0  (18 B / 32 weights)  d: f16, qs: 16 B          w = d * (q - 8)   -> 4-bit, scale d, bias -8d
    Q4_1  (20 B / 32 weights)  d: f16, m: f16, qs: 16 B  w = d * q + m     -> 4-bit, scale d, bias m
    Q8_0  (34 B / 32 weights)  d: f16, qs: 32 x int8     w = d * q         -> 8-bit, q + 128, bias -128d

Nibble order differs: GGUF keeps weight j in the low nibble of byte j and weight j + 16 in its high
nibble; MLX packs weights in order, low nibble first, into little-endian uint32 words:

    GGUF qs byte j : [hi: w(j+16) | lo: w(j)]             j = 0..15
    MLX  byte b    : [hi: w(2b+1) | lo: w(2b)]            4 bytes = one uint32 (8 weights)

The products d * q are exact in float32 (11-bit mantissa times a small integer), and -8d / -128d are
exact too, so MLX's ``scale * q + bias`` gives the same float32 numbers as gguf's dequantizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from mlxserve.errors import UnsupportedModelError

from ..quantize import QuantSpec
from .config import CONFIG_TENSORS, Family
from .reader import GGUFFile, GGUFTensorInfo

GROUP_SIZE = 32
LOSSLESS_BITS: dict[int, int] = {int(T.Q4_0): 4, int(T.Q4_1): 4, int(T.Q8_0): 8}
_FLOAT_VIEWS = {int(T.F32): np.float32, int(T.F16): np.float16, int(T.F64): np.float64}
_FP16_MAX = 65504.0


@dataclass(frozen=True, slots=True)
class PackedQuant:
    """MLX affine-quantized weight. weight: (rows, cols * bits / 32) uint32; scales, biases:
    (rows, cols / 32) float32 holding values that float16 represents exactly."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int = GROUP_SIZE

    def take_rows(self, order: np.ndarray) -> PackedQuant:
        """Reorder output rows (a row never shares a quantization block with another)."""
        return PackedQuant(self.weight[order], self.scales[order], self.biases[order], self.bits, self.group_size)

    def fits_float16(self) -> bool:
        return bool(np.abs(self.scales).max() <= _FP16_MAX and np.abs(self.biases).max() <= _FP16_MAX)


def can_dequantize(ggml_type: int) -> bool:
    return ggml_type in _FLOAT_VIEWS or T(ggml_type) in quants._type_traits


def dequantize(gf: GGUFFile, info: GGUFTensorInfo) -> np.ndarray:
    """The tensor as float32, in HF shape order."""
    raw = gf.tensor_bytes(info.name)
    if info.ggml_type in _FLOAT_VIEWS:
        out = raw.view(_FLOAT_VIEWS[info.ggml_type]).astype(np.float32)
    elif can_dequantize(info.ggml_type):
        out = quants.dequantize(raw, T(info.ggml_type)).astype(np.float32, copy=False)
    else:
        raise UnsupportedModelError(
            f"{gf.path.name}: tensor {info.name!r} is stored as {info.type_name}, which cannot be dequantized"
        )
    return out.reshape(info.shape)


def is_lossless_type(ggml_type: int) -> bool:
    return ggml_type in LOSSLESS_BITS


def repack(gf: GGUFFile, info: GGUFTensorInfo) -> PackedQuant:
    """A Q4_0 / Q4_1 / Q8_0 2-D tensor as MLX affine quantization, bit for bit the same weights."""
    raw = gf.tensor_bytes(info.name)
    return repack_blocks(raw, info.ggml_type, rows=info.shape[0])


def repack_blocks(raw: np.ndarray, ggml_type: int, rows: int) -> PackedQuant:
    """raw: the tensor's bytes (any shape, rows * blocks_per_row blocks)."""
    if ggml_type == T.Q8_0:
        blocks = raw.reshape(-1, 34)
        d = _f16(blocks[:, 0:2])
        q = blocks[:, 2:] ^ np.uint8(0x80)  # int8 q -> uint8 q + 128
        return _packed(q, d, -128.0 * d, 8, rows)
    if ggml_type == T.Q4_0:
        blocks = raw.reshape(-1, 18)
        d = _f16(blocks[:, 0:2])
        return _packed(_mlx_nibbles(blocks[:, 2:]), d, -8.0 * d, 4, rows)
    if ggml_type == T.Q4_1:
        blocks = raw.reshape(-1, 20)
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        return _packed(_mlx_nibbles(blocks[:, 4:]), d, m, 4, rows)
    raise ValueError(f"ggml type {ggml_type} has no lossless MLX form")


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(two_bytes).view(np.float16)[:, 0].astype(np.float32)


def _mlx_nibbles(qs: np.ndarray) -> np.ndarray:
    """(blocks, 16) GGUF nibble bytes -> (blocks, 16) bytes in MLX order (see the module docstring)."""
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)  # (blocks, 32): w0..w31
    return q[:, 0::2] | (q[:, 1::2] << np.uint8(4))


def _packed(q_bytes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, rows: int) -> PackedQuant:
    weight = np.ascontiguousarray(q_bytes).view("<u4").reshape(rows, -1)
    return PackedQuant(weight, scales.reshape(rows, -1), biases.reshape(rows, -1), bits)


# ---- llama.cpp's q/k row permutation -------------------------------------------------------------


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's RoPE permutation of a llama q/k projection.

    llama.cpp rotates interleaved pairs (GPT-J style) while HF rotates the two halves of each head,
    so its converter stores, within each head of ``d = head_dim`` rows, the rows in the order
    0, d/2, 1, d/2+1, ...  HF row (h, s, j) (half s, index j) sits at GGUF row (h, j, s):

        hf[h*d + s*d/2 + j] = gguf[h*d + 2j + s]
    """
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)


# ---- the whole model ----------------------------------------------------------------------------------


@dataclass
class ConvertedWeights:
    """HF-named MLX tensors plus what happened to them. quantization: the config block, or None."""

    tensors: dict[str, mx.array] = field(default_factory=dict)
    quantization: dict | None = None
    lossless_tensors: int = 0
    requantized_tensors: int = 0
    num_parameters: int = 0


def convert_weights(
    gf: GGUFFile,
    family: Family,
    config: Mapping,
    quant: QuantSpec | None,
    dtype: mx.Dtype,
    on_tensor: Callable[[int], None] | None = None,
) -> ConvertedWeights:
    """Every GGUF tensor under its HF name: Q4_0/Q4_1/Q8_0 matrices repacked without loss (when
    ``quant`` is set), other matrices dequantized and re-quantized with ``quant``, the rest ``dtype``.

    Exactness of the repacked blocks holds for float16 and float32 ``dtype``; bfloat16 rounds the
    block scales to 8 mantissa bits. One GGUF tensor is in flight at a time, so peak memory is the
    output plus one float32 tensor. ``on_tensor(nbytes)`` is called after each GGUF tensor."""
    result = ConvertedWeights(quantization={**quant.to_dict()} if quant is not None else None)
    for info in gf.tensors.values():
        if info.name not in CONFIG_TENSORS:
            _convert_one(gf, info, family, config, quant, dtype, result)
            result.num_parameters += info.num_elements
        if on_tensor is not None:
            on_tensor(info.nbytes)
    return result


def _convert_one(
    gf: GGUFFile, info: GGUFTensorInfo, family: Family, config: Mapping,
    quant: QuantSpec | None, dtype: mx.Dtype, result: ConvertedWeights,
) -> None:
    hf_name = family.hf_name(info.name)
    if hf_name is None:
        raise UnsupportedModelError(
            f"{gf.path.name}: tensor {info.name!r} has no counterpart in a {family.model_type} model"
        )
    module, kind = hf_name.rsplit(".", 1)
    is_matrix = kind == "weight" and len(info.shape) == 2
    order = _row_order(family, info, config)
    if quant is not None and is_matrix and is_lossless_type(info.ggml_type):
        packed = repack(gf, info)
        packed = packed.take_rows(order) if order is not None else packed
        if dtype != mx.float16 or packed.fits_float16():  # else: an fp16 bias would overflow
            _emit_quantized(result, module, packed.weight, packed.scales, packed.biases, dtype)
            if (packed.bits, packed.group_size) != (quant.bits, quant.group_size):
                result.quantization[module] = {"bits": packed.bits, "group_size": packed.group_size, "mode": "affine"}
            result.lossless_tensors += 1
            return
    w = dequantize(gf, info)
    if order is not None:
        w = w[order]
    if family.norm_shift and hf_name.endswith("norm.weight"):
        w = w - np.float32(family.norm_shift)  # llama.cpp exported Gemma norms as 1 + w
    if quant is not None and is_matrix:
        if w.shape[-1] % quant.group_size == 0:
            weight, scales, biases = mx.quantize(mx.array(w, dtype=dtype), group_size=quant.group_size, bits=quant.bits)
            _emit_quantized(result, module, weight, scales, biases, dtype)
            result.requantized_tensors += 1
            return
        result.quantization[module] = False  # input size not a multiple of the group: kept float
    result.tensors[hf_name] = mx.array(w, dtype=dtype)


def _emit_quantized(result: ConvertedWeights, module: str, weight, scales, biases, dtype: mx.Dtype) -> None:
    # Scales in the model dtype: MLX's quantized matmul returns the scales' dtype.
    out = (mx.array(weight), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype))
    mx.eval(out)  # now, so the float weight it was made from is freed before the next tensor
    for suffix, array in zip(("weight", "scales", "biases"), out):
        result.tensors[f"{module}.{suffix}"] = array


def _row_order(family: Family, info: GGUFTensorInfo, config: Mapping) -> np.ndarray | None:
    if not family.permute_qk:
        return None
    if ".attn_q." in info.name:
        return unpermute_rows(info.shape[0], config["num_attention_heads"])
    if ".attn_k." in info.name:
        return unpermute_rows(info.shape[0], config["num_key_value_heads"])
    return None
