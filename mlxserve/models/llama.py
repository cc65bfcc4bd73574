"""Llama family (Llama 2/3.x, SmolLM, DeepSeek-R1 Llama distills), the template the others reuse.

ModelArgs -> Attention -> MLP -> Block -> Model(sanitize). Weight names are Hugging Face's, so
mlx-lm and mlx-community checkpoints load as they are. Mistral, Qwen2 and Qwen3 differ only by
flags on these classes (attention bias, q/k norms, sliding windows) and reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlxserve.models.base import BaseModelArgs, RMSNorm, make_cache
from mlxserve.models.rope import make_rope
from mlxserve.ops.attention import attention


@dataclass
class ModelArgs(BaseModelArgs):
    attention_bias: bool = False
    mlp_bias: bool = False

    # Switches for the families that reuse these classes.
    qkv_bias: bool = False  # Qwen2: bias on q/k/v, none on o
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, args.rms_norm_eps)
        theta, scaling = args.rope_for(layer_idx)
        rotary_dims = int(head_dim * args.extra.get("partial_rotary_factor", 1.0))
        self.rope = make_rope(rotary_dims, theta, scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache) -> mx.array:
        B, L, _ = x.shape
        has_norm = "q_norm" in self
        q = _to_heads(self.q_proj(x), self.n_heads, self.q_norm if has_norm else None)  # (B, H, L, D)
        k = _to_heads(self.k_proj(x), self.n_kv_heads, self.k_norm if has_norm else None)
        v = _to_heads(self.v_proj(x), self.n_kv_heads)
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        kv = cache.update(k, v)
        out = attention(q, kv.keys, kv.values, scale=self.scale, mask=kv.mask)
        if L > 1:
            out = out.transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(B, L, -1))


def _to_heads(x: mx.array, num_heads: int, norm: nn.Module | None = None) -> mx.array:
    """(B, L, H * D) projections -> (B, H, L, D), with an optional per-head norm over D.

    For one token (decode), (B, 1, H * D) already has the memory layout of (B, H, 1, D): a reshape
    replaces reshape + transpose. MLX's CPU backend pays a fixed cost per op, which is most of a
    small model's decode step, so the ops saved in every layer show in tokens/s.
    """
    B, L, _ = x.shape
    if L == 1:
        x = x.reshape(B, num_heads, 1, -1)
        return x if norm is None else norm(x)
    x = x.reshape(B, L, num_heads, -1)
    if norm is not None:
        x = norm(x)
    return x.transpose(0, 2, 1, 3)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused op (uncompiled it is two, plus an intermediate buffer)."""
    return nn.silu(gate) * up


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """``model.*`` in HF names: embeddings, blocks, final norm."""

    def __init__(self, args: ModelArgs, block_cls: type[nn.Module] = Block) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [block_cls(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        h = self.embed_tokens(inputs)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    block_cls: type[nn.Module] = Block

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DecoderStack(args, self.block_cls)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """inputs (B, L) token ids -> logits (B, L, vocab). Without a cache, a fresh one is used."""
        h = self.model(inputs, cache if cache is not None else self.make_cache())
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self, max_kv_size: int | None = None) -> list:
        return make_cache(self.args, max_kv_size)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop what HF checkpoints carry but the model computes itself."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
