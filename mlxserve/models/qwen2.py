"""Qwen2 / Qwen2.5: Llama anatomy with biases on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.models import llama
from mlxserve.models.base import FULL, SLIDING


@dataclass
class ModelArgs(llama.ModelArgs):
    qkv_bias: bool = True
    use_sliding_window: bool = False
    max_window_layers: int = 0

    def __post_init__(self) -> None:
        if not self.use_sliding_window:
            self.sliding_window = None  # HF ignores sliding_window unless use_sliding_window
        super().__post_init__()

    def default_layer_types(self) -> list[str]:
        # HF: layers at or above max_window_layers slide when use_sliding_window is on.
        return [
            SLIDING if self.use_sliding_window and i >= self.max_window_layers else FULL
            for i in range(self.num_hidden_layers)
        ]


class Model(llama.Model):
    pass
