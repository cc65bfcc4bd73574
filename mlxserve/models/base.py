"""Shared pieces of the model definitions: config parsing in both hub styles, caches, norms.

Hugging Face configs come in two styles:

* classic: ``rope_theta`` + ``rope_scaling`` (+ ``sliding_window_pattern`` for Gemma 3);
* transformers 5: ``rope_parameters`` (one dict, or one per layer type, e.g. Gemma 3's
  ``{"full_attention": {...}, "sliding_attention": {...}}``) + ``layer_types``.

``BaseModelArgs.from_dict`` reads either into the same fields, so model files never see the
difference: ``rope_theta``/``rope_scaling`` for full-attention layers, ``rope_local`` for sliding
ones, and ``layer_types`` always filled in.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn

from mlxserve.errors import ModelLoadError
from mlxserve.models.cache import KVCache, RotatingKVCache, make_layer_cache

FULL, SLIDING = "full_attention", "sliding_attention"
# rope_parameters keys that are not scaling settings
_ROPE_NON_SCALING = {"rope_theta", "partial_rotary_factor"}


@dataclass
class BaseModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # RoPE of sliding-window layers when it differs (Gemma 3's rope_local_base_freq).
    rope_local: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = self.default_layer_types()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"config.json: layer_types has {len(self.layer_types)} entries "
                f"for {self.num_hidden_layers} layers"
            )

    def default_layer_types(self) -> list[str]:
        """Layer types when the config has no ``layer_types`` (classic style). Families override."""
        return [FULL] * self.num_hidden_layers

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "BaseModelArgs":
        config = dict(config)
        config.update(_normalize_rope(config))
        names = {f.name for f in dataclasses.fields(cls)}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        # A null in config.json means "use the default" (transformers 5 writes rope_theta: null).
        known = {
            k: v for k, v in config.items()
            if k in names and k != "extra" and not (v is None and defaults.get(k) not in (None, dataclasses.MISSING))
        }
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in known and _required(f)]
        if missing:
            raise ModelLoadError(f"config.json is missing required keys: {', '.join(missing)}")
        extra = {k: v for k, v in config.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json has invalid values: {e}") from None

    def window_of(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        if self.layer_types[layer_idx] == SLIDING and self.sliding_window:
            return int(self.sliding_window)
        return None

    def rope_for(self, layer_idx: int) -> tuple[float, dict | None]:
        """(theta, scaling) of one layer's RoPE."""
        if self.layer_types[layer_idx] == SLIDING and self.rope_local is not None:
            local = dict(self.rope_local)
            theta = float(local.pop("rope_theta", self.rope_theta))
            return theta, (local or None)
        return float(self.rope_theta), self.rope_scaling


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _split_rope(params: Mapping[str, Any]) -> tuple[float | None, dict | None]:
    """A transformers-5 rope dict -> (theta, scaling-or-None)."""
    theta = params.get("rope_theta")
    scaling = {k: v for k, v in params.items() if k not in _ROPE_NON_SCALING}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (None if rope_type == "default" and len(scaling) <= 1 else scaling)


def _normalize_rope(config: Mapping[str, Any]) -> dict:
    """Map ``rope_parameters`` (transformers 5) onto rope_theta / rope_scaling / rope_local."""
    out: dict[str, Any] = {}
    if "rope_local_base_freq" in config:  # classic Gemma 3: local layers use plain RoPE
        out["rope_local"] = {"rope_theta": config["rope_local_base_freq"]}
    params = config.get("rope_parameters")
    if not params:
        return out
    if not isinstance(params, Mapping):
        raise ModelLoadError("config.json: rope_parameters must be an object")
    if FULL in params or SLIDING in params:  # one rope dict per layer type
        theta, scaling = _split_rope(params.get(FULL, {}))
        if SLIDING in params:
            out["rope_local"] = dict(params[SLIDING])
    else:
        theta, scaling = _split_rope(params)
    if theta is not None:
        out["rope_theta"] = theta
    out["rope_scaling"] = scaling
    return out


def make_cache(args: BaseModelArgs, max_kv_size: int | None = None) -> list[KVCache | RotatingKVCache]:
    """One cache per layer: sliding layers get their window, others everything or ``max_kv_size``."""
    return [make_layer_cache(args.window_of(i), max_kv_size) for i in range(args.num_hidden_layers)]


def filter_kwargs(fn: Any, kwargs: Mapping[str, Any]) -> dict:
    """The subset of ``kwargs`` that ``fn`` accepts."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


class RMSNorm(nn.Module):
    """RMSNorm with an optional (1 + weight) parameterisation (Gemma stores weight - 1)."""

    def __init__(self, dims: int, eps: float = 1e-6, *, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = mx.ones((dims,)) if offset == 0.0 else mx.zeros((dims,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight if self.offset == 0.0 else self.weight + self.offset
        return mx.fast.rms_norm(x, weight, self.eps)
