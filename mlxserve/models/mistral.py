"""Mistral: the Llama architecture with an optional sliding window on every layer."""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.models import llama
from mlxserve.models.base import FULL, SLIDING


@dataclass
class ModelArgs(llama.ModelArgs):
    def default_layer_types(self) -> list[str]:
        # Mistral 7B v0.1 slides every layer over 4096 tokens; later versions set sliding_window null.
        return [SLIDING if self.sliding_window else FULL] * self.num_hidden_layers


class Model(llama.Model):
    pass
