"""Rotary position embeddings: the variants found in Hugging Face configs.

Every variant reduces to ``mx.fast.rope`` with either a ``base`` or an explicit per-dimension
``freqs`` table (periods, so angle = position / freq), plus an optional scale on the rotated part.
``make_rope(dims, rope_theta, rope_scaling, max_position_embeddings)`` picks one from the config;
``rope_scaling`` is already normalised by ``models.base`` (both the classic ``rope_scaling`` and the
transformers-5 ``rope_parameters`` style end up here as one dict).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from mlxserve.errors import ModelLoadError


class RoPE(nn.Module):
    """Plain or table-driven RoPE. ``freqs`` (dims/2,) periods override ``base`` when given."""

    def __init__(
        self,
        dims: int,
        *,
        base: float = 10000.0,
        scale: float = 1.0,
        freqs: mx.array | None = None,
        mscale: float = 1.0,
        traditional: bool = False,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.base = None if freqs is not None else base
        self.scale = scale
        self.mscale = mscale
        self.traditional = traditional
        self._freqs = freqs  # leading underscore: not a parameter, never saved

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """x: (B, H, L, D); rotates the first ``dims`` features of positions offset..offset+L-1."""
        if self.mscale != 1.0:
            x = x.at[..., : self.dims].multiply(self.mscale)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )


def _inv_freq_periods(dims: int, base: float) -> mx.array:
    """Periods base^(2i/dims), i = 0..dims/2-1 (the reciprocal of HF's inv_freq)."""
    return base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)


def _llama3(dims: int, base: float, cfg: Mapping[str, Any], max_pos: int) -> RoPE:
    # Llama 3.1 "llama3" scaling: long wavelengths divided by factor, short kept, smooth in between.
    factor = float(cfg["factor"])
    low = float(cfg.get("low_freq_factor", 1.0))
    high = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg.get("original_max_position_embeddings", 8192))
    periods = _inv_freq_periods(dims, base)
    wavelens = 2 * math.pi * periods
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelens - low) / (high - low)
    smoothed = periods / ((1 - smooth) / factor + smooth)
    freqs = mx.where(wavelens > low_wavelen, periods * factor, periods)
    is_mid = (wavelens <= low_wavelen) & (wavelens >= high_wavelen)
    freqs = mx.where(is_mid, smoothed, freqs)
    return RoPE(dims, freqs=freqs)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dims: int, base: float, cfg: Mapping[str, Any], max_pos: int) -> RoPE:
    # YaRN (Peng et al. 2023): blend interpolated and extrapolated frequencies by a linear ramp.
    factor = float(cfg["factor"])
    old_ctx = float(cfg.get("original_max_position_embeddings", max_pos))
    beta_fast = float(cfg.get("beta_fast", 32.0))
    beta_slow = float(cfg.get("beta_slow", 1.0))

    def correction_dim(num_rotations: float) -> float:
        return dims * math.log(old_ctx / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = (mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low)
    extrapolation_weight = 1.0 - mx.clip(ramp, 0, 1)
    periods = _inv_freq_periods(dims, base)
    inv = (1.0 / (periods * factor)) * (1 - extrapolation_weight) + (1.0 / periods) * extrapolation_weight
    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        m, m_all = float(cfg.get("mscale", 1.0)), float(cfg.get("mscale_all_dim", 0.0))
        attention_factor = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m_all else _yarn_mscale(factor)
    return RoPE(dims, freqs=1.0 / inv, mscale=float(attention_factor))


def _longrope(dims: int, base: float, cfg: Mapping[str, Any], max_pos: int) -> RoPE:
    # Phi-3 "longrope"/"su": per-dimension factors; long factors once past the original context.
    old_ctx = int(cfg.get("original_max_position_embeddings") or max_pos)
    factors = cfg["long_factor"] if max_pos > old_ctx else cfg["short_factor"]
    freqs = mx.array(factors, dtype=mx.float32) * _inv_freq_periods(dims, base)
    factor = max_pos / old_ctx
    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
    return RoPE(dims, freqs=freqs, mscale=float(attention_factor))


def _default(dims: int, base: float, cfg: Mapping[str, Any], max_pos: int) -> RoPE:
    return RoPE(dims, base=base)


def _linear(dims: int, base: float, cfg: Mapping[str, Any], max_pos: int) -> RoPE:
    return RoPE(dims, base=base, scale=1.0 / float(cfg["factor"]))


ROPE_BUILDERS: dict[str, Callable[[int, float, Mapping[str, Any], int], RoPE]] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
    "longrope": _longrope,
    "su": _longrope,
}


def make_rope(
    dims: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None, max_position_embeddings: int
) -> RoPE:
    """Build the RoPE a config asks for. ``rope_scaling`` None means plain RoPE."""
    cfg = dict(rope_scaling or {})
    rope_type = cfg.get("rope_type") or cfg.get("type") or "default"
    if rope_type not in ROPE_BUILDERS:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(sorted(ROPE_BUILDERS))}"
        )
    return ROPE_BUILDERS[rope_type](dims, float(rope_theta), cfg, int(max_position_embeddings))
