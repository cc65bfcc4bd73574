"""GGUF metadata -> Hugging Face config.json, and GGUF tensor names -> HF weight names, per family.

One ``Family`` row per supported GGUF ``general.architecture``; dispatch goes through ``FAMILIES``.
What llama.cpp's converter changed on export and we undo here (see ``tensor_transform`` users):

* llama: q/k rows permuted for its interleaved RoPE (``Family.permute_qk``);
* gemma2/gemma3: every ``*norm.weight`` stored as ``1 + w`` (``Family.norm_shift``);
* llama 3.x RoPE scaling stored as a ``rope_freqs`` factor table instead of config keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlxserve.errors import CorruptCheckpointError, UnsupportedModelError

from .reader import GGUFFile

VectorReader = Callable[[str], np.ndarray]  # tensor name -> float32 values

_GLOBAL_NAMES: Mapping[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES: Mapping[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA_NAMES: Mapping[str, str] = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_NAMES: Mapping[str, str] = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Tensors whose content becomes config (RoPE factor tables), not weights.
CONFIG_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
_MAX_SIZE = 1 << 24  # bound on any count or size read from metadata (layers, heads, widths)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto an HF ``model_type``."""

    arch: str
    model_type: str
    architecture: str
    layer_names: Mapping[str, str] = field(default_factory=lambda: _LAYER_NAMES)
    permute_qk: bool = False
    norm_shift: float = 0.0
    default_rope_theta: float = 10000.0
    extra_config: Callable[[_Meta, VectorReader], dict] = lambda meta, read: {}

    def hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        match = _BLOCK_RE.match(gguf_name)
        if match is None or match.group(2) not in self.layer_names:
            return None
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{self.layer_names[part]}.{kind}"


@dataclass(frozen=True)
class _Meta:
    """Typed access to ``{arch}.*`` metadata, with the file name for error messages."""

    gf: GGUFFile
    arch: str

    def get(self, key: str, default: Any = None) -> Any:
        return self.gf.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CorruptCheckpointError(f"{self.gf.path.name}: metadata {self.arch}.{key} is missing")
        return value

    def uniform_int(self, key: str, default: int | None = None) -> int:
        """A positive int, or a per-layer list holding one such value (mixed layouts are not supported)."""
        value = self.get(key, default)
        if value is None:
            value = self.require(key)
        if isinstance(value, list):
            if not value or len(set(value)) != 1:
                raise UnsupportedModelError(
                    f"{self.gf.path.name}: {self.arch}.{key} differs between layers; not supported"
                )
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_SIZE:
            raise CorruptCheckpointError(
                f"{self.gf.path.name}: metadata {self.arch}.{key} must be a positive integer, not {str(value)[:40]!r}"
            )
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise CorruptCheckpointError(f"{self.gf.path.name}: metadata {self.arch}.{key} must be a number, not {str(value)[:40]!r}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        """A number, with 0 and a missing key both meaning "not set"."""
        return self.number(key, 0.0) or None

    def optional_int(self, key: str) -> int | None:
        return self.uniform_int(key) if self.get(key) not in (None, 0) else None

    @property
    def num_heads(self) -> int:
        return self.uniform_int("attention.head_count")

    @property
    def num_kv_heads(self) -> int:
        return self.uniform_int("attention.head_count_kv", self.num_heads)

    @property
    def hidden_size(self) -> int:
        return self.uniform_int("embedding_length")

    def head_dim(self) -> int:
        """From the q (or fused qkv) projection's rows: the file's own shapes beat any metadata key."""
        heads, kv_heads, tensors = self.num_heads, self.num_kv_heads, self.gf.tensors
        q = tensors.get("blk.0.attn_q.weight")
        if q is not None and q.shape[0] % heads == 0:
            return q.shape[0] // heads
        qkv = tensors.get("blk.0.attn_qkv.weight")
        if qkv is not None and qkv.shape[0] % (heads + 2 * kv_heads) == 0:
            return qkv.shape[0] // (heads + 2 * kv_heads)
        return self.uniform_int("attention.key_length", self.hidden_size // heads)


def family_of(gf: GGUFFile) -> Family:
    arch = gf.get("general.architecture")
    if arch not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"{gf.path.name}: GGUF architecture {arch!r} is not supported; supported GGUF architectures: {supported}"
        )
    return FAMILIES[arch]


def build_config(gf: GGUFFile, family: Family, read_vector: VectorReader) -> dict:
    """The HF config.json for ``gf`` (float weights; the caller adds quantization and dtype)."""
    meta = _Meta(gf, family.arch)
    embed = gf.tensors.get("token_embd.weight")
    if embed is None:
        raise CorruptCheckpointError(f"{gf.path.name}: no token_embd.weight tensor")
    config: dict[str, Any] = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "hidden_size": meta.hidden_size,
        "num_hidden_layers": meta.uniform_int("block_count"),
        "intermediate_size": meta.uniform_int("feed_forward_length"),
        "num_attention_heads": meta.num_heads,
        "num_key_value_heads": meta.num_kv_heads,
        "head_dim": meta.head_dim(),
        "vocab_size": embed.shape[0],
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": meta.uniform_int("context_length", 4096),
        "rope_theta": meta.number("rope.freq_base", family.default_rope_theta),
        "rope_scaling": _rope_scaling(meta),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = gf.get(f"tokenizer.ggml.{name}_token_id")
        if isinstance(value, int):
            config[key] = value
    config.update(family.extra_config(meta, read_vector))
    return config


def _rope_scaling(meta: _Meta) -> dict | None:
    """``{arch}.rope.scaling.*`` keys -> an HF rope_scaling dict."""
    kind = meta.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = meta.number("rope.scaling.factor", float("nan"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if meta.optional_int("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = meta.uniform_int("rope.scaling.original_context_length")
        for hf_key in ("beta_fast", "beta_slow"):
            value = meta.optional_number(f"rope.scaling.yarn_{hf_key}")
            if value is not None:
                scaling[hf_key] = value
        return scaling
    raise UnsupportedModelError(f"{meta.gf.path.name}: RoPE scaling type {kind!r} is not supported")


# ---- family specifics -----------------------------------------------------------------------------


def _llama_extra(meta: _Meta, read: VectorReader) -> dict:
    extra = {"attention_bias": "blk.0.attn_q.bias" in meta.gf.tensors, "mlp_bias": False}
    if "rope_freqs.weight" in meta.gf.tensors:
        theta = meta.number("rope.freq_base", 10000.0)
        extra["rope_scaling"] = llama3_scaling_from_factors(read("rope_freqs.weight"), theta, meta.head_dim(), meta)
    return extra


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, meta: _Meta) -> dict | None:
    """Recover Llama 3.1 ``rope_scaling`` from llama.cpp's per-frequency factor table.

    llama.cpp stores f_i = period multiplier: 1 for short wavelengths, ``factor`` for long ones and
    1 / ((1 - s) / factor + s) between, with s = (old_ctx / wavelen - low) / (high - low). Every
    Llama 3.x uses low_freq_factor 1; (high, old_ctx) come from the smooth band (least squares), and
    the result must reproduce the table, or the file is refused.
    """
    fname = meta.gf.path.name
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2:
        raise CorruptCheckpointError(f"{fname}: rope_freqs has {factors.size} entries, expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    wavelens = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    high, old = 4.0, float(meta.uniform_int("rope.scaling.original_context_length", 8192))
    if mid.any():
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        x = 1 / wavelens[mid]
        if mid.sum() >= 2:  # s * (high - 1) = old * x - 1  ->  [s, -x] @ [high, old] = s - 1
            (high, old), *_ = np.linalg.lstsq(np.stack([s, -x], axis=1), s - 1, rcond=None)
        else:
            old = (s[0] * (high - 1) + 1) / x[0]
    scaling = {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": round(float(old)),
    }
    if not np.allclose(_llama3_factors(scaling, wavelens), factors, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(f"{fname}: rope_freqs does not follow Llama 3 RoPE scaling; not supported")
    return scaling


def _llama3_factors(scaling: Mapping[str, Any], wavelens: np.ndarray) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    s = (old / wavelens - low) / (high - low)
    smooth = 1 / ((1 - s) / factor + s)
    return np.where(wavelens < old / high, 1.0, np.where(wavelens > old / low, factor, smooth))


def _qwen2_extra(meta: _Meta, read: VectorReader) -> dict:
    return {"use_sliding_window": False, "max_window_layers": meta.uniform_int("block_count")}


def _gemma_common(meta: _Meta) -> dict:
    hidden, heads, head_dim = meta.hidden_size, meta.num_heads, meta.head_dim()
    scale = meta.optional_number("attention.scale")
    if scale is not None:  # an explicit 1/sqrt(query_pre_attn_scalar), stored in float32
        query_scalar = 1.0 / scale**2
        if abs(query_scalar - round(query_scalar)) < 1e-4 * query_scalar:
            query_scalar = round(query_scalar)
    elif meta.uniform_int("block_count") in _GEMMA_27B_LAYERS.get(meta.arch, ()):
        query_scalar = hidden / heads  # llama.cpp's rule: only the 27B models scale by hidden / heads
    else:
        query_scalar = head_dim
    return {
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": meta.optional_int("attention.sliding_window"),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
    }


_GEMMA_27B_LAYERS: Mapping[str, tuple[int, ...]] = {"gemma2": (46,), "gemma3": (62,)}


def _gemma2_extra(meta: _Meta, read: VectorReader) -> dict:
    extra = _gemma_common(meta)
    extra["attn_logit_softcapping"] = meta.optional_number("attn_logit_softcapping")
    extra["final_logit_softcapping"] = meta.optional_number("final_logit_softcapping")
    return extra


def _gemma3_extra(meta: _Meta, read: VectorReader) -> dict:
    extra = _gemma_common(meta)
    extra["rope_local_base_freq"] = meta.number("rope.freq_base_swa", 10000.0)  # llama.cpp's default
    extra["final_logit_softcapping"] = meta.optional_number("final_logit_softcapping")
    extra["attn_logit_softcapping"] = None
    pattern = meta.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer: true = sliding
        extra["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        extra["sliding_window_pattern"] = meta.optional_int("attention.sliding_window_pattern") or 6
    return extra


def _phi3_extra(meta: _Meta, read: VectorReader) -> dict:
    gf, head_dim = meta.gf, meta.head_dim()
    rotary = meta.uniform_int("rope.dimension_count", head_dim)
    original = meta.uniform_int("rope.scaling.original_context_length", meta.uniform_int("context_length", 4096))
    extra: dict[str, Any] = {
        "partial_rotary_factor": rotary / head_dim,
        "sliding_window": meta.optional_int("attention.sliding_window"),
        "original_max_position_embeddings": original,
        "attention_bias": False,
    }
    if "rope_factors_long.weight" in gf.tensors and "rope_factors_short.weight" in gf.tensors:
        scaling = {
            "rope_type": "longrope",
            "long_factor": [float(v) for v in read("rope_factors_long.weight").reshape(-1)],
            "short_factor": [float(v) for v in read("rope_factors_short.weight").reshape(-1)],
        }
        attn_factor = meta.optional_number("rope.scaling.attn_factor")
        if attn_factor is not None:
            scaling["attention_factor"] = attn_factor
        extra["rope_scaling"] = scaling
    return extra


FAMILIES: Mapping[str, Family] = {
    "llama": Family(
        arch="llama", model_type="llama", architecture="LlamaForCausalLM",
        permute_qk=True, extra_config=_llama_extra,
    ),
    "qwen2": Family(
        arch="qwen2", model_type="qwen2", architecture="Qwen2ForCausalLM",
        default_rope_theta=1_000_000.0, extra_config=_qwen2_extra,
    ),
    "qwen3": Family(
        arch="qwen3", model_type="qwen3", architecture="Qwen3ForCausalLM",
        default_rope_theta=1_000_000.0, extra_config=_qwen2_extra,
    ),
    "gemma2": Family(
        arch="gemma2", model_type="gemma2", architecture="Gemma2ForCausalLM",
        layer_names=_GEMMA_NAMES, norm_shift=1.0, extra_config=_gemma2_extra,
    ),
    "gemma3": Family(
        arch="gemma3", model_type="gemma3_text", architecture="Gemma3ForCausalLM",
        layer_names=_GEMMA_NAMES, norm_shift=1.0, default_rope_theta=1_000_000.0, extra_config=_gemma3_extra,
    ),
    "phi3": Family(
        arch="phi3", model_type="phi3", architecture="Phi3ForCausalLM",
        layer_names=_PHI3_NAMES, extra_config=_phi3_extra,
    ),
}
SUPPORTED_GGUF_ARCHS: tuple[str, ...] = tuple(sorted(FAMILIES))
