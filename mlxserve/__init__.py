"""mlxserve: run, serve and fine-tune large language models on Apple Silicon with MLX.

    import mlxserve
    model, tokenizer = mlxserve.load("path/to/model")
    print(mlxserve.generate(model, tokenizer, "Hello", max_tokens=32))
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "__version__", "generate", "load", "stream_generate"]


def __getattr__(name: str):
    # Lazy so `import mlxserve` (and the CLI's --help) does not pay for importing MLX.
    if name in ("load", "generate", "stream_generate", "GenerationResponse"):
        from mlxserve import api

        return getattr(api, name)
    if name == "LLM":
        from mlxserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'mlxserve' has no attribute {name!r}")
