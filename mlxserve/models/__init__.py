"""Model registry: Hugging Face ``model_type`` -> the module that defines it.

One module per ``model_type`` (file name == model_type, the mlx-lm convention). Dispatch goes
through this table, never through if/elif on the model name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mlxserve.errors import UnsupportedModelError

# model_type -> module name under mlxserve.models
MODEL_MODULES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "phi3": "phi3",
}

# Aliases seen on the hub that share an existing definition.
MODEL_REMAPPING: dict[str, str] = {
    "gemma3": "gemma3_text",  # text-only checkpoints saved from Gemma3ForCausalLM
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(MODEL_MODULES))


def get_model_module(model_type: str | None) -> ModuleType:
    """Return the module defining ``ModelArgs`` and ``Model`` for ``model_type``."""
    key = MODEL_REMAPPING.get(model_type or "", model_type or "")
    if key not in MODEL_MODULES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by mlxserve; supported: {supported}"
        )
    return importlib.import_module(f"mlxserve.models.{MODEL_MODULES[key]}")
