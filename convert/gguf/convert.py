"""GGUF file (or Ollama store entry) -> MLX model folder.

    source = resolve_gguf_source("model.gguf" | "folder/" | "ollama:NAME[:TAG]")
    result = convert_gguf(source, Path("out"), quantize=True, bits=4, group_size=64)

read + validate header -> family and config.json -> tokenizer files -> tensors (lossless repack or
dequantize / re-quantize) -> save_model_dir (staging folder, then an atomic rename).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxserve.errors import (
    ConvertError,
    CorruptCheckpointError,
    ModelLoadError,
    UnsupportedModelError,
)
from mlxserve.models.loader import apply_quantization, build_model

from ..ollama import OllamaModel, find_ollama_model, is_ollama_ref
from ..quantize import NON_DIVISIBLE_RULE, QuantSpec
from ..save import save_model_dir
from .config import build_config, family_of
from .reader import GGUF_MAGIC, GGUFFile, read_gguf
from .tensors import convert_weights, dequantize
from .tokenizer import TokenizerBuild, build_tokenizer

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DEFAULT_DTYPE = "float16"
OLLAMA_RECORD = "ollama.json"
_SPLIT_NAME_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
# Ollama parameter -> generation_config.json key.
_OLLAMA_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repeat_penalty": "repetition_penalty"}

ProgressFactory = Callable[[int, str], Callable[[int], None]]


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file to convert, and the Ollama entry it came from (template, params) if any.
    Path-like: ``Path(source)`` is the GGUF file."""

    path: Path
    ollama: OllamaModel | None = None

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class GGUFConvertResult:
    output: Path
    model_type: str
    num_parameters: int
    output_bytes: int
    quantization: dict | None
    lossless_tensors: int
    requantized_tensors: int


def resolve_gguf_source(src: str | Path) -> GGUFSource | None:
    """``ollama:NAME[:TAG]``, a GGUF file, or a folder holding exactly one ``*.gguf``; None when
    ``src`` is none of those (e.g. a Hugging Face folder or repo id)."""
    if isinstance(src, str) and is_ollama_ref(src):
        model = find_ollama_model(src)
        return GGUFSource(path=model.model_blob, ollama=model)
    path = Path(src).expanduser()
    if path.is_file():
        return GGUFSource(path=path) if path.suffix.lower() == ".gguf" or _has_gguf_magic(path) else None
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ConvertError(f"folder '{path.name}' holds several GGUF files ({names}); pass one of them", param="source")
        return GGUFSource(path=found[0]) if found else None
    return None


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def convert_gguf(
    gguf_path: Path | GGUFSource,
    out: Path,
    *,
    quantize: bool = True,
    bits: int = 4,
    group_size: int = 64,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
) -> GGUFConvertResult:
    """Convert one GGUF file into an MLX model folder at ``out``.

    quantize: Q4_0/Q4_1/Q8_0 matrices keep their exact values (MLX affine, group 32, recorded as
    per-layer overrides); other matrices are re-quantized to ``bits``/``group_size``. Without it
    every tensor is dequantized to ``dtype`` (default float16), which is also the dtype of norms,
    scales and biases. ``progress(total_bytes, label)`` returns an ``update(n_bytes)`` callback.
    """
    source = gguf_path if isinstance(gguf_path, GGUFSource) else GGUFSource(path=Path(gguf_path))
    out = Path(out)
    dtype_name = dtype or DEFAULT_DTYPE
    if dtype_name not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype_name!r}", param="dtype")
    quant = QuantSpec(bits=bits, group_size=group_size, mode="affine").validate() if quantize else None
    if out.exists() and not overwrite:
        raise ConvertError(f"output '{out}' already exists; pass --overwrite to replace it", param="output")
    gf = read_gguf(source.path)
    _refuse_split(gf)
    family = family_of(gf)
    config = build_config(gf, family, lambda name: dequantize(gf, gf.tensors[name]))
    tok = build_tokenizer(gf)
    total_in = sum(t.nbytes for t in gf.tensors.values())
    weights = convert_weights(
        gf, family, config, quant, DTYPES[dtype_name], progress(total_in, "converting") if progress else None,
    )
    config["torch_dtype"] = dtype_name
    if weights.quantization is not None:
        block = {**weights.quantization, "non_divisible": NON_DIVISIBLE_RULE}
        config["quantization"] = block
        config["quantization_config"] = block  # mlx-lm writes both
    tensors = weights.tensors
    _check_fits_model(config, tensors, gf.path.name)
    files = _side_files(tok, source.ollama)
    out_bytes = sum(t.nbytes for t in tensors.values())
    saved = save_model_dir(
        out, tensors, config, extra_files=files, overwrite=overwrite,
        progress=progress(out_bytes, "writing") if progress else None, consume=True,
    )
    return GGUFConvertResult(
        output=out, model_type=family.model_type, num_parameters=weights.num_parameters,
        output_bytes=saved.total_bytes, quantization=config.get("quantization"),
        lossless_tensors=weights.lossless_tensors, requantized_tensors=weights.requantized_tensors,
    )


def gguf_to_hf_folder(gguf_path: Path | GGUFSource, out_dir: Path, dtype: str = "float32") -> Path:
    """A plain (dequantized) checkpoint folder: config.json, model.safetensors, tokenizer files.
    Replaces an earlier conversion at ``out_dir``."""
    return convert_gguf(gguf_path, out_dir, quantize=False, dtype=dtype, overwrite=True).output


def _check_fits_model(config: dict, tensors: dict[str, mx.array], fname: str) -> None:
    """The tensors must be exactly the parameters of the model the config describes (checked on a
    lazy skeleton, so nothing is allocated): a bad file fails here, not when it is first loaded."""
    try:
        model = build_model(config)
        if "quantization" in config:
            apply_quantization(model, config["quantization"], tensors)
    except UnsupportedModelError:
        raise
    except ModelLoadError as e:
        raise CorruptCheckpointError(f"{fname}: its metadata does not describe a valid model: {e}") from None
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    problems = [f"missing {n}" for n in sorted(set(expected) - set(got))]
    problems += [f"unexpected {n}" for n in sorted(set(got) - set(expected))]
    problems += [f"{n} is {got[n]}, expected {expected[n]}" for n in sorted(set(got) & set(expected)) if got[n] != expected[n]]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CorruptCheckpointError(
            f"{fname}: tensors do not match the {config['model_type']} model its metadata describes: "
            + "; ".join(problems[:3]) + more
        )


def _refuse_split(gf: GGUFFile) -> None:
    count = gf.get("split.count", 1)
    if (isinstance(count, int) and count > 1) or _SPLIT_NAME_RE.search(gf.path.name):
        raise UnsupportedModelError(
            f"{gf.path.name} is one part of a split GGUF; merge the parts first "
            "(llama-gguf-split --merge FIRST-PART OUT.gguf) and convert the merged file"
        )


def _side_files(tok: TokenizerBuild, ollama: OllamaModel | None) -> dict[str, str]:
    files = {
        "tokenizer.json": tok.tokenizer_json,
        "tokenizer_config.json": _json(tok.tokenizer_config),
        "generation_config.json": _json(generation_config(tok, ollama)),
    }
    if ollama is not None:
        files[OLLAMA_RECORD] = _json(ollama.to_dict())
    return files


def generation_config(tok: TokenizerBuild, ollama: OllamaModel | None = None) -> dict[str, Any]:
    """bos/eos/pad ids; with an Ollama entry also its stop strings and sampling defaults.

    A stop string that is one special token of the vocabulary becomes an eos id (what ends
    generation in mlxserve); any other becomes a ``stop_strings`` entry."""
    stop_ids = list(tok.stop_ids)
    config: dict[str, Any] = {}
    params = (ollama.params or {}) if ollama is not None else {}
    stops = params.get("stop", [])
    stop_strings = []
    special = json.loads(tok.tokenizer_json).get("added_tokens", [])
    special_ids = {t["content"]: t["id"] for t in special if t.get("special")}
    for stop in stops if isinstance(stops, list) else [stops]:
        if isinstance(stop, str) and stop in special_ids:
            stop_ids.append(special_ids[stop])
        elif isinstance(stop, str) and stop:
            stop_strings.append(stop)
    stop_ids = list(dict.fromkeys(stop_ids))
    for key, token_id in (("bos_token_id", tok.special_ids.get("bos_token")), ("pad_token_id", tok.special_ids.get("pad_token"))):
        if token_id is not None:
            config[key] = token_id
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if stop_strings:
        config["stop_strings"] = stop_strings
    for key, hf_key in _OLLAMA_SAMPLING.items():
        if isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            config[hf_key] = params[key]
    return config


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
