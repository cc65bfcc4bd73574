"""The Python API: ``load``, ``generate``, ``stream_generate``."""

from __future__ import annotations

from pathlib import Path

import mlx.nn as nn

from mlxserve.generation.generate import GenerationResponse, generate, stream_generate
from mlxserve.io.source import resolve_model_path
from mlxserve.models.loader import load_model
from mlxserve.tokenizer.wrapper import Tokenizer

__all__ = ["GenerationResponse", "generate", "load", "stream_generate"]


def load(path_or_repo: str | Path, *, revision: str | None = None, lazy: bool = False) -> tuple[nn.Module, Tokenizer]:
    """Load a model and its tokenizer from a local folder or a Hugging Face repo id."""
    path = resolve_model_path(str(path_or_repo), revision=revision)
    loaded = load_model(path, lazy=lazy)
    return loaded.model, Tokenizer.from_pretrained(path)
