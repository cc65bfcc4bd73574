"""Gemma 2: pre- and post-norms around attention and MLP, (1 + w) RMSNorm, GELU-tanh MLP,
scaled embeddings, attention and final logit soft-capping, alternating sliding-window layers.
Gemma 3 (text) reuses these classes with q/k norms switched on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxserve.models.base import FULL, SLIDING, BaseModelArgs, RMSNorm, make_cache
from mlxserve.models.rope import make_rope
from mlxserve.ops.attention import attention


@dataclass
class ModelArgs(BaseModelArgs):
    head_dim: int | None = 256
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    qk_norm: bool = False

    def default_layer_types(self) -> list[str]:
        # HF Gemma 2: even layers slide, odd layers attend globally.
        return [SLIDING if (i + 1) % 2 else FULL for i in range(self.num_hidden_layers)]


def gemma_norm(dims: int, eps: float) -> RMSNorm:
    return RMSNorm(dims, eps, offset=1.0)  # Gemma stores weight - 1


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = (args.query_pre_attn_scalar or head_dim) ** -0.5
        self.softcap = args.attn_logit_softcapping
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias)
        if args.qk_norm:
            self.q_norm = gemma_norm(head_dim, args.rms_norm_eps)
            self.k_norm = gemma_norm(head_dim, args.rms_norm_eps)
        theta, scaling = args.rope_for(layer_idx)
        self.rope = make_rope(head_dim, theta, scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, cache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, H, L, D)
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        kv = cache.update(k, v)
        out = attention(q, kv.keys, kv.values, scale=self.scale, mask=kv.mask, softcap=self.softcap)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(dim, args.intermediate_size)
        self.input_layernorm = gemma_norm(dim, eps)
        self.post_attention_layernorm = gemma_norm(dim, eps)
        self.pre_feedforward_layernorm = gemma_norm(dim, eps)
        self.post_feedforward_layernorm = gemma_norm(dim, eps)

    def __call__(self, x: mx.array, cache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = gemma_norm(args.hidden_size, args.rms_norm_eps)
        self.embed_scale = math.sqrt(args.hidden_size)

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        h = self.embed_tokens(inputs)
        # HF rounds the scale to the activation dtype before multiplying.
        h = h * mx.array(self.embed_scale, dtype=h.dtype)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DecoderStack(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        h = self.model(inputs, cache if cache is not None else self.make_cache())
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.args.final_logit_softcapping
        if cap:
            logits = mx.tanh(logits.astype(mx.float32) / cap) * cap
        return logits

    def make_cache(self, max_kv_size: int | None = None) -> list:
        return make_cache(self.args, max_kv_size)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
