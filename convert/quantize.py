"""Quantization settings, mixed-precision recipes and the per-layer map written to config.json.

The written ``quantization`` block follows mlx-lm's convention, so both loaders read it:
``{"group_size": 64, "bits": 4, "mode": "affine", "<module path>": {"bits": 8, ...} | false}``.
A layer whose input size does not divide the group size stays in full precision and is listed
as ``false`` (the rule is recorded under ``quantization["non_divisible"]``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.nn as nn

from mlxserve.errors import ConvertError

# mode -> (allowed bits, allowed group sizes); MLX's quantize checks the same combinations.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
    "mxfp8": ((8,), (32,)),
}
NON_DIVISIBLE_RULE = "keep-full-precision"


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def validate(self) -> "QuantSpec":
        if self.mode not in MODES:
            raise ConvertError(f"--q-mode must be one of {', '.join(MODES)}, not {self.mode!r}", param="q_mode")
        bits, groups = MODES[self.mode]
        if self.bits not in bits:
            allowed = ", ".join(map(str, bits))
            raise ConvertError(f"--q-bits {self.bits} is not valid for {self.mode}; use one of {allowed}", param="q_bits")
        if self.group_size not in groups:
            allowed = ", ".join(map(str, groups))
            raise ConvertError(
                f"--q-group-size {self.group_size} is not valid for {self.mode}; use one of {allowed}",
                param="q_group_size",
            )
        return self

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


# A recipe maps (module path, layer index or None, number of layers, base spec) -> spec for that layer.
Recipe = Callable[[str, "int | None", int, QuantSpec], QuantSpec]


def _uniform(path: str, layer: int | None, num_layers: int, base: QuantSpec) -> QuantSpec:
    return base


def _high_bits(bits: int) -> Recipe:
    """Embeddings and the output head at ``bits``: they hurt most when squeezed (mlx-lm does the same)."""

    def recipe(path: str, layer: int | None, num_layers: int, base: QuantSpec) -> QuantSpec:
        if path.endswith(("embed_tokens", "lm_head")):
            return QuantSpec(bits, _affine_group(base), "affine")
        return base

    return recipe


def _affine_group(base: QuantSpec) -> int:
    """The base's group size where affine allows it, else the nearest one (nvfp4's 16 -> 32)."""
    return min(MODES["affine"][1], key=lambda g: abs(g - base.group_size))


def _mixed(low: int, high: int) -> Recipe:
    """Most weights at ``low`` bits; sensitive ones at ``high``: the head, embeddings, and v/down
    projections of the first and last eighth of the layers and every third one between."""

    def recipe(path: str, layer: int | None, num_layers: int, base: QuantSpec) -> QuantSpec:
        if base.mode != "affine":  # it mixes affine widths; over mxfp4 it would silently drop mxfp4
            raise ConvertError(
                f"--quant-recipe mixed_{low}_{high} mixes affine bit widths; use it with --q-mode affine, "
                f"not {base.mode}", param="quant_recipe",
            )
        hi, lo = QuantSpec(high, base.group_size), QuantSpec(low, base.group_size)
        if path.endswith(("embed_tokens", "lm_head")):
            return hi
        if layer is not None and path.endswith(("v_proj", "down_proj", "qkv_proj")):
            edge = max(1, num_layers // 8)
            if layer < edge or layer >= num_layers - edge or (layer - edge) % 3 == 2:
                return hi
        return lo

    return recipe


RECIPES: dict[str, Recipe] = {
    "uniform": _uniform,
    "high-embed": _high_bits(8),
    "mixed_2_6": _mixed(2, 6),
    "mixed_3_4": _mixed(3, 4),
    "mixed_3_6": _mixed(3, 6),
    "mixed_4_6": _mixed(4, 6),
    "mixed_4_8": _mixed(4, 8),
}


def load_recipe(name_or_path: str | None) -> Recipe:
    """A named recipe, or a JSON file mapping regexes over module paths to settings or false."""
    if not name_or_path:
        return _uniform
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(RECIPES)
        raise ConvertError(f"--quant-recipe {name_or_path!r} is neither a recipe ({names}) nor a JSON file", param="quant_recipe")
    try:
        rules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"--quant-recipe {path.name}: {e}", param="quant_recipe") from None
    if not isinstance(rules, dict):
        raise ConvertError(
            f"--quant-recipe {path.name} must hold a JSON object mapping module-path regexes to "
            "{bits, group_size, mode} or false", param="quant_recipe",
        )
    return _file_recipe([_compile_rule(path.name, pattern, spec) for pattern, spec in rules.items()])


_RULE_TYPES = {"bits": int, "group_size": int, "mode": str}


def _compile_rule(file_name: str, pattern: str, spec: object) -> tuple[re.Pattern, dict | bool]:
    """One recipe-file rule, checked up front: an unknown key must not surface mid-conversion."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConvertError(f"--quant-recipe {file_name}: bad regex {pattern!r} ({e})", param="quant_recipe") from None
    ok = spec is False or (
        isinstance(spec, dict)
        and all(k in _RULE_TYPES and type(v) is _RULE_TYPES[k] for k, v in spec.items())
    )
    if not ok:
        raise ConvertError(
            f"--quant-recipe {file_name}: the value for {pattern!r} must be false or an object with "
            f"integer bits / group_size and string mode, not {json.dumps(spec)}", param="quant_recipe",
        )
    return regex, spec


def _file_recipe(rules: list) -> Recipe:
    def recipe(path: str, layer: int | None, num_layers: int, base: QuantSpec) -> QuantSpec | None:
        for pattern, spec in rules:
            if pattern.search(path):
                if spec is False:
                    return None
                return QuantSpec(**{**base.to_dict(), **spec})
        return base

    return recipe


_LAYER_RE = re.compile(r"\blayers\.(\d+)\.")


def quantize_model(model: nn.Module, base: QuantSpec, recipe: Recipe = _uniform) -> dict:
    """Quantize ``model`` in place; returns the config ``quantization`` block."""
    base.validate()
    num_layers = len(model.layers)
    block: dict = {**base.to_dict(), "non_divisible": NON_DIVISIBLE_RULE}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        match = _LAYER_RE.search(path + ".")
        spec = recipe(path, int(match.group(1)) if match else None, num_layers, base)
        if spec is not None and spec != base:
            _check_layer_spec(path, spec)  # before the divisibility test: a group size of 0 must not divide
        in_dims = module.weight.shape[-1]
        if spec is None or in_dims % spec.group_size != 0:
            block[path] = False
            return False
        if spec != base:
            block[path] = spec.to_dict()
        return spec.to_dict()

    nn.quantize(model, class_predicate=predicate)
    return block


def _check_layer_spec(path: str, spec: QuantSpec) -> None:
    """A recipe's per-layer setting must be one MLX can quantize (a ConvertError, not MLX's ValueError)."""
    try:
        spec.validate()
    except ConvertError as e:
        raise ConvertError(
            f"--quant-recipe sets {path} to {spec.to_dict()}, which cannot be used: {e}", param="quant_recipe"
        ) from None


def bits_per_weight(num_bytes: int, num_parameters: int) -> float:
    return 8.0 * num_bytes / max(num_parameters, 1)

