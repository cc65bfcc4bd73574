"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama anatomy with fused qkv_proj and gate_up_proj weights
(kept fused, as the HF names are), LongRoPE scaling, and a sliding window on every layer when set.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxserve.models import llama
from mlxserve.models.base import FULL, SLIDING, RMSNorm
from mlxserve.models.rope import make_rope
from mlxserve.ops.attention import attention


@dataclass
class ModelArgs(llama.ModelArgs):
    partial_rotary_factor: float = 1.0

    def default_layer_types(self) -> list[str]:
        return [SLIDING if self.sliding_window else FULL] * self.num_hidden_layers


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        op_size = (self.n_heads + 2 * self.n_kv_heads) * head_dim
        self.qkv_proj = nn.Linear(dim, op_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=args.attention_bias)
        theta, scaling = args.rope_for(layer_idx)
        rotary_dims = int(head_dim * args.partial_rotary_factor)
        self.rope = make_rope(rotary_dims, theta, scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache) -> mx.array:
        B, L, _ = x.shape
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        q = qkv[..., :q_end].reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = qkv[..., q_end:k_end].reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = qkv[..., k_end:].reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        kv = cache.update(k, v)
        out = attention(q, kv.keys, kv.values, scale=self.scale, mask=kv.mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class Block(llama.Block):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(llama.Model):
    block_cls = Block
