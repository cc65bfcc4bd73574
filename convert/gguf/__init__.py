"""GGUF import (installed as ``mlxserve.convert.gguf``): llama.cpp / Ollama / LM Studio files -> MLX.

    from mlxserve.convert.gguf import convert_gguf, resolve_gguf_source
    source = resolve_gguf_source("ollama:smollm2")      # or a .gguf file, or a folder holding one
    result = convert_gguf(source, Path("out"))          # lossless Q4_0/Q4_1/Q8_0, the rest 4-bit
"""

from .config import SUPPORTED_GGUF_ARCHS
from .convert import (
    GGUFConvertResult,
    GGUFSource,
    convert_gguf,
    gguf_to_hf_folder,
    resolve_gguf_source,
)
from .reader import GGUFFile, read_gguf

__all__ = [
    "SUPPORTED_GGUF_ARCHS",
    "GGUFConvertResult",
    "GGUFFile",
    "GGUFSource",
    "convert_gguf",
    "gguf_to_hf_folder",
    "read_gguf",
    "resolve_gguf_source",
]
