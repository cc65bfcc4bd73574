"""``convert(ConvertConfig) -> ConvertReport``: Hugging Face checkpoint in, MLX model folder out.

resolve source -> validate every file -> build the model on lazy weights -> cast -> quantize ->
stream the tensors into a staging folder -> rename into place -> verify against the source.
Weights are read from disk only when a tensor is written, and freed right after, so peak memory
stays near the size of the largest tensor plus the output's quantized data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mlxserve.errors import ConvertError
from mlxserve.models.loader import load_model, quantization_of

from .gguf import convert_gguf, resolve_gguf_source
from .hf import read_checkpoint, resolve_source
from .quantize import QuantSpec, bits_per_weight, load_recipe, quantize_model
from .save import save_model_dir
from .verify import VerifyReport, compare

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Verification runs both models in full; above this much source data it is skipped unless forced.
AUTO_VERIFY_MAX_BYTES = 2 * 2**30
# config.json keys that describe the source's own packaging, wrong for the output.
_DROP_CONFIG_KEYS = ("auto_map", "quantization_config")


@dataclass(frozen=True)
class ConvertConfig:
    source: str
    output: Path
    revision: str | None = None
    quantize: bool = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    recipe: str | None = None
    dtype: str | None = None  # None: keep the source dtype
    overwrite: bool = False
    verify: bool | None = None  # None: verify when the source is small enough
    max_shard_bytes: int = 5 * 2**30

    def validate(self) -> "ConvertConfig":
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}", param="dtype")
        if self.quantize:
            self.quant.validate()
        elif self.recipe:
            raise ConvertError("--quant-recipe needs quantization; drop --no-quantize", param="quant_recipe")
        load_recipe(self.recipe)
        return self


@dataclass(frozen=True)
class ConvertReport:
    output: Path
    model_type: str
    num_parameters: int
    output_bytes: int
    bits_per_weight: float
    seconds: float
    quantization: dict | None
    verify: VerifyReport | None


ProgressFactory = Callable[[int, str], Callable[[int], None]]


def convert(cfg: ConvertConfig, progress: ProgressFactory | None = None) -> ConvertReport:
    """Run a conversion; ``progress(total_bytes, label)`` returns an ``update(n_bytes)`` callback."""
    start = time.perf_counter()
    cfg.validate()
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise ConvertError(f"output '{out}' already exists; pass --overwrite to replace it", param="output")
    gguf = resolve_gguf_source(cfg.source)
    if gguf is not None:
        return _convert_gguf(gguf, cfg, progress, start)
    source = resolve_source(cfg.source, revision=cfg.revision)
    ckpt = read_checkpoint(source)
    _refuse_requantizing(ckpt.config, source, cfg)
    tensors, config, quant_block = _prepare_tensors(source, cfg)
    out_bytes_estimate = sum(t.nbytes for t in tensors.values())
    update = progress(out_bytes_estimate, "writing") if progress else None
    saved = save_model_dir(
        out, tensors, config, tokenizer_files=ckpt.tokenizer_files, overwrite=cfg.overwrite,
        max_shard_bytes=cfg.max_shard_bytes, progress=update, consume=True,
    )
    weight_bytes = out_bytes_estimate
    do_verify = cfg.verify if cfg.verify is not None else ckpt.total_bytes <= AUTO_VERIFY_MAX_BYTES
    report = compare(source, out) if do_verify else None
    return ConvertReport(
        output=out, model_type=ckpt.model_type, num_parameters=ckpt.num_parameters,
        output_bytes=saved.total_bytes, bits_per_weight=bits_per_weight(weight_bytes, ckpt.num_parameters),
        seconds=time.perf_counter() - start, quantization=quant_block, verify=report,
    )


def _convert_gguf(gguf, cfg: ConvertConfig, progress: ProgressFactory | None, start: float) -> ConvertReport:
    """GGUF files and Ollama models: Q4_0/Q4_1/Q8_0 kept losslessly, other types re-quantized."""
    if cfg.recipe:
        raise ConvertError("--quant-recipe is not supported for GGUF sources yet", param="quant_recipe")
    if cfg.quantize and cfg.quant.mode != "affine":
        raise ConvertError("GGUF sources convert to affine quantization only; drop --q-mode", param="q_mode")
    result = convert_gguf(
        gguf, Path(cfg.output), quantize=cfg.quantize, bits=cfg.quant.bits, group_size=cfg.quant.group_size,
        dtype=cfg.dtype or default_float_dtype(), overwrite=cfg.overwrite, progress=progress,
    )
    return ConvertReport(
        output=result.output, model_type=result.model_type, num_parameters=result.num_parameters,
        output_bytes=result.output_bytes, bits_per_weight=bits_per_weight(result.output_bytes, result.num_parameters),
        seconds=time.perf_counter() - start, quantization=result.quantization, verify=None,
    )


def default_float_dtype() -> str:
    """float32 on a CPU (MLX's half-precision matmuls are far slower there), float16 on a GPU."""
    on_gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return "float16" if on_gpu else "float32"


def _refuse_requantizing(config: dict, source: Path, cfg: ConvertConfig) -> None:
    """Quantized layers have no ``to_quantized``: they would keep their bits under a new config block."""
    quant = quantization_of(config)
    if cfg.quantize and quant is not None:
        raise ConvertError(
            f"'{source.name}' is already quantized ({quant['bits']}-bit, group {quant['group_size']}); "
            "convert from the full-precision checkpoint, or pass --no-quantize to copy it as it is",
            param="source",
        )


def _prepare_tensors(source: Path, cfg: ConvertConfig) -> tuple[dict, dict, dict | None]:
    """The output's tensors (lazy), config and quantization block."""
    loaded = load_model(source, lazy=True)
    model, config = loaded.model, dict(loaded.config)
    del loaded
    if cfg.dtype is not None:
        _cast(model, DTYPES[cfg.dtype])
        config["torch_dtype"] = cfg.dtype
        config.pop("dtype", None)
    quant_block = None
    if cfg.quantize:
        quant_block = quantize_model(model, cfg.quant, load_recipe(cfg.recipe))
    for key in _DROP_CONFIG_KEYS:
        config.pop(key, None)
    if quant_block is not None:
        config["quantization"] = quant_block
        config["quantization_config"] = quant_block  # mlx-lm writes both
    tensors = dict(tree_flatten(model.parameters()))
    return tensors, config, quant_block


def _cast(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating-point parameters (not integer ones such as packed weights) to ``dtype``."""

    def cast(path: str, x: mx.array) -> mx.array:
        return x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_map_with_path(cast, model.parameters()))
