"""Build a model from a folder: config.json, safetensors shards (validated, lazy), quantization.

The same path loads Hugging Face checkpoints (weights in their stored dtype), our converted output
and mlx-community / mlx-lm conversions (``quantization`` block in config.json, quantized layers
identified by their ``.scales`` tensors, per-layer overrides keyed by module path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxserve.errors import ModelLoadError
from mlxserve.io.checkpoint_files import find_weight_files, read_config
from mlxserve.io.safetensors import load_tensors
from mlxserve.models import get_model_module
from mlxserve.models.base import BaseModelArgs

QUANT_KEYS = ("group_size", "bits", "mode")


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    args: BaseModelArgs
    config: dict
    path: Path


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """An uninitialised model (random weights) for ``config``."""
    module = get_model_module(config.get("model_type"))
    return module.Model(module.ModelArgs.from_dict(config))


def quantization_of(config: Mapping[str, Any]) -> dict | None:
    """The MLX quantization block of a config, or None (HF's own quantization_config is not MLX's)."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None
    method = quant.get("quant_method")
    if method is not None and "quantization" not in config:
        # GPTQ, AWQ, bitsandbytes, fp8 ...: another library's packing, not MLX's.
        raise ModelLoadError(
            f"this checkpoint is quantized with {method!r}, which mlxserve cannot load; "
            "use the full-precision checkpoint (and convert it with `mlxserve convert`)"
        )
    if "bits" in quant and "group_size" in quant:
        return dict(quant)
    return None


def apply_quantization(model: nn.Module, quant: Mapping[str, Any], weights: Mapping[str, mx.array]) -> None:
    """Swap in quantized layers wherever the checkpoint holds ``<path>.scales``.

    ``quant`` holds the defaults (bits, group_size, mode) and per-layer overrides keyed by module
    path: a dict of settings, or False for a layer kept in full precision (mlx-lm's convention).
    """
    defaults = {k: quant[k] for k in QUANT_KEYS if k in quant}
    defaults.setdefault("mode", "affine")

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        if isinstance(override, Mapping):
            return {**defaults, **{k: override[k] for k in QUANT_KEYS if k in override}}
        return override is not False and defaults

    nn.quantize(model, class_predicate=predicate)


def load_model(path: str | Path, *, lazy: bool = False) -> LoadedModel:
    """Load the model in ``path``. With ``lazy`` the weights stay on disk until first used."""
    path = Path(path)
    config = read_config(path)
    model = build_model(config)
    weights = load_tensors(find_weight_files(path))
    weights = model.sanitize(weights)
    quant = quantization_of(config)
    if quant is not None:
        apply_quantization(model, quant, weights)
    _load_strict(model, weights, path)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return LoadedModel(model=model, args=model.args, config=config, path=path)


def _load_strict(model: nn.Module, weights: Mapping[str, mx.array], path: Path) -> None:
    """Load every parameter, failing with the missing/extra/mismatched names listed."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected weights (e.g. {', '.join(extra[:3])})")
        raise ModelLoadError(f"weights in {path.name} do not match the model: " + "; ".join(parts))
    bad = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise ModelLoadError(
            f"weight {k} in {path.name} has shape {tuple(weights[k].shape)}, "
            f"the config implies {tuple(expected[k].shape)} ({len(bad)} mismatched)"
        )
    model.load_weights(list(weights.items()), strict=True)
