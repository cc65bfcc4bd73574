"""Gemma 3 (text): Gemma 2's blocks with q/k RMSNorms, no attention soft-capping, five sliding
layers per global one, and a separate RoPE base for the sliding layers (rope_local_base_freq).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.models import gemma2
from mlxserve.models.base import FULL, SLIDING


@dataclass
class ModelArgs(gemma2.ModelArgs):
    qk_norm: bool = True
    sliding_window_pattern: int = 6
    rope_theta: float = 1_000_000.0

    def __post_init__(self) -> None:
        if self.rope_local is None:
            self.rope_local = {"rope_theta": 10000.0}  # HF default rope_local_base_freq
        super().__post_init__()

    def default_layer_types(self) -> list[str]:
        n = self.sliding_window_pattern
        return [SLIDING if (i + 1) % n else FULL for i in range(self.num_hidden_layers)]


class Model(gemma2.Model):
    def sanitize(self, weights: dict) -> dict:
        # Text weights saved from the multimodal Gemma3ForConditionalGeneration carry a prefix.
        weights = {k.removeprefix("language_model."): v for k, v in weights.items()}
        return super().sanitize(weights)
