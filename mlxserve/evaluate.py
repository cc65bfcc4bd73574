"""Perplexity of a model on a text: how well it predicts each next token.

The token stream is cut into consecutive windows of ``context`` tokens (no overlap); inside each
window every token after the first is predicted from the ones before it. Perplexity is
exp(mean negative log-likelihood) over all predicted tokens. ``to_float32`` runs a model in float32
first: quantized weights keep exactly their quantized values and half-precision weights are upcast,
only the arithmetic is float32, which MLX's CPU backend does far faster than quantized or float16.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxserve.errors import InvalidRequestError
from mlxserve.tokenizer.wrapper import Tokenizer


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per token
    num_tokens: int  # tokens predicted
    num_windows: int


def read_eval_tokens(path: Path, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a plain-text file, or of a JSONL file's "text" fields (EOS between records)."""
    if not path.is_file():
        raise InvalidRequestError(f"data file {path.name!r} does not exist", param="data")
    raw = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix != ".jsonl":
        return tokenizer.encode(raw, add_special_tokens=False)
    eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
    tokens: list[int] = []
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise InvalidRequestError(f"{path.name}:{line_no}: expected a JSON object with a \"text\" string", param="data") from None
        tokens += tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])
    return tokens


def dequantize_model(model: nn.Module, dtype: mx.Dtype = mx.float32) -> None:
    """Replace quantized layers by float ones holding exactly the dequantized weights (in place)."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            replacements.append((path, _dequantized(module, dtype)))
    if replacements:
        model.update_modules(_tree(replacements))


def to_float32(model: nn.Module) -> None:
    """Run a model in float32: quantized layers expanded exactly, half-precision weights upcast."""
    from mlx.utils import tree_map

    dequantize_model(model, mx.float32)
    model.update(tree_map(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
                          model.parameters()))


def _dequantized(module: nn.Module, dtype: mx.Dtype) -> nn.Module:
    weight = mx.dequantize(
        module.weight, module.scales, module.get("biases"), group_size=module.group_size,
        bits=module.bits, mode=module.mode,
    ).astype(dtype)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
        layer.weight = weight
        return layer
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
    layer.weight = weight
    if "bias" in module:
        layer.bias = module.bias.astype(dtype)
    return layer


def _tree(pairs: list[tuple[str, nn.Module]]) -> dict:
    """{"a.b.0.c": m} -> nested dicts/lists as Module.update_modules expects."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)


def perplexity(model: nn.Module, tokens: list[int], *, context: int = 512, max_tokens: int | None = None) -> PerplexityResult:
    if context < 2:
        raise InvalidRequestError("--context must be at least 2 tokens", param="context")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise InvalidRequestError("the data has fewer than 2 tokens", param="data")
    total_nll, count, windows = 0.0, 0, 0
    for start in range(0, len(tokens) - 1, context):
        window = tokens[start : start + context]
        if len(window) < 2:
            break
        ids = mx.array([window], dtype=mx.int32)
        logits = model(ids[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="sum")
        total_nll += nll.item()
        count += len(window) - 1
        windows += 1
    mean = total_nll / count
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, num_tokens=count, num_windows=windows)
