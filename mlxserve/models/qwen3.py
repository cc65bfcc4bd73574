"""Qwen3 (dense): Qwen2's layout without q/k/v biases, plus RMSNorm over each head of q and k."""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.models import qwen2


@dataclass
class ModelArgs(qwen2.ModelArgs):
    qkv_bias: bool = False
    qk_norm: bool = True


class Model(qwen2.Model):
    pass
