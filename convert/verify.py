"""Check a conversion by the numbers: reload the output and compare its logits with the source's.

On a few fixed prompts: the largest absolute logit difference, the mean KL divergence
KL(source || output) per position, and how often the greedy (top-1) token agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxserve.models.loader import load_model

VERIFY_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Water boils at 100 degrees Celsius at sea level, and",
    "1, 1, 2, 3, 5, 8, 13,",
)
MAX_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    mean_kl: float
    top1_agreement: float  # fraction of positions where the argmax token is the same
    num_positions: int


def verify_prompts(folder: Path, vocab_size: int) -> list[list[int]]:
    """Token ids of the fixed prompts, through the checkpoint's tokenizer when it has one."""
    try:
        from mlxserve.tokenizer.wrapper import Tokenizer

        tokenizer = Tokenizer.from_pretrained(folder)
        prompts = [tokenizer.encode(t)[:MAX_PROMPT_TOKENS] for t in VERIFY_TEXTS]
        if all(prompts):
            return prompts
    except Exception:  # noqa: BLE001 - a missing tokenizer only means we fall back to fixed ids
        pass
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (5, 11, 17, 23)]


def _logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    out = []
    for ids in prompts:
        logits = model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32)
        out.append(np.array(logits))
    return out


def compare(source: Path, output: Path) -> VerifyReport:
    """Logit comparison of ``output`` against ``source`` on the fixed prompts."""
    src = load_model(source, lazy=True)
    prompts = verify_prompts(output, src.args.vocab_size)
    ref = _logits(src.model, prompts)
    del src  # free the source weights before the output model is read
    out = _logits(load_model(output, lazy=True).model, prompts)
    max_diff, kls, agree, n = 0.0, [], 0, 0
    for a, b in zip(ref, out):
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        log_p, log_q = _log_softmax(a), _log_softmax(b)
        kls.extend((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).tolist())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return VerifyReport(max_abs_diff=max_diff, mean_kl=float(np.mean(kls)), top1_agreement=agree / n, num_positions=n)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
