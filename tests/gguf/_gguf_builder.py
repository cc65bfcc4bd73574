"""Write tiny GGUF files for tests, the way llama.cpp's converter would, with gguf.GGUFWriter.

``build_gguf(ckpt, out, arch)`` turns one of the tiny HF fixture checkpoints (tests/fixtures) into a
GGUF: llama.cpp tensor names, its q/k row permutation for llama, Gemma norms stored as 1 + w,
Llama 3 RoPE scaling as a ``rope_freqs`` table, the byte-level BPE tokenizer as ``tokenizer.ggml.*``.
Each tensor is stored in the ggml type ``types(hf_name)`` picks. It returns the weights a perfect
importer must recover (HF names, float32, after the quantization round trip), so tests compare an
import with a model built from exactly those numbers.

Written independently of mlxserve.convert.gguf (its own name table and permutation), from
llama.cpp's convert_hf_to_gguf.py conventions.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file

CONTROL, NORMAL = 3, 1

_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA_NAMES = {
    **_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


@dataclass(frozen=True)
class BuiltGGUF:
    path: Path
    weights: dict[str, np.ndarray]  # HF name -> what the GGUF really holds, back in HF layout
    types: dict[str, int]  # HF name -> ggml type written


def all_f32(name: str) -> int:
    return T.F32


def gguf_name(hf: str, gemma: bool) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf in globals_:
        return globals_[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_GEMMA_NAMES if gemma else _NAMES)[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF half-split rows -> interleaved rows per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_gguf(
    ckpt: Path,
    out: Path,
    arch: str,
    types: Callable[[str], int] = all_f32,
    extra_metadata: Mapping[str, Any] | None = None,
    drop_tensors: tuple[str, ...] = (),
    extra_tensors: Mapping[str, np.ndarray] | None = None,
    tokenizer_pre: str = "gpt2",
    omit_metadata: tuple[str, ...] = (),
) -> BuiltGGUF:
    config = json.loads((ckpt / "config.json").read_text())
    hf_weights = load_file(str(ckpt / "model.safetensors"))
    gemma = arch.startswith("gemma")
    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in {**_metadata(arch, config), **(extra_metadata or {})}.items():
        if key not in omit_metadata:
            _add_value(writer, key, value)
    _write_tokenizer(writer, ckpt, tokenizer_pre)
    effective, written = {}, {}
    if config.get("rope_scaling") and config["rope_scaling"].get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(config))
    for hf, w in hf_weights.items():
        name = gguf_name(hf, gemma)
        if name in drop_tensors:
            continue
        g, inverse = _to_gguf_layout(hf, w.astype(np.float32), arch, config, gemma)
        qtype = T(types(hf)) if w.ndim == 2 else T.F32  # ggml keeps 1-D tensors in F32
        data = gguf.quants.quantize(g, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
        back = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(g.shape)
        effective[hf], written[hf] = inverse(back), int(qtype)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return BuiltGGUF(path=out, weights=effective, types=written)


def _to_gguf_layout(hf: str, w: np.ndarray, arch: str, config: dict, gemma: bool):
    """(GGUF tensor, function mapping GGUF-layout values back to HF layout)."""
    if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
        heads = config["num_attention_heads"] if ".q_proj." in hf else config["num_key_value_heads"]
        order = llama_cpp_permute(np.arange(w.shape[0]), heads)
        return w[order], lambda back: back[np.argsort(order)]
    if gemma and hf.endswith("norm.weight"):
        return w + np.float32(1.0), lambda back: back - np.float32(1.0)
    return w, lambda back: back


def _metadata(arch: str, config: dict) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp writes for this config (ints as uint32, floats as float32)."""
    a = arch
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    meta: dict[str, Any] = {
        "general.name": "tiny-" + config["model_type"],
        "general.file_type": 0,
        f"{a}.block_count": config["num_hidden_layers"],
        f"{a}.context_length": config["max_position_embeddings"],
        f"{a}.embedding_length": config["hidden_size"],
        f"{a}.feed_forward_length": config["intermediate_size"],
        f"{a}.attention.head_count": config["num_attention_heads"],
        f"{a}.attention.head_count_kv": config["num_key_value_heads"],
        f"{a}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{a}.rope.freq_base": float(config["rope_theta"]),
        f"{a}.attention.key_length": head_dim,
        f"{a}.attention.value_length": head_dim,
        f"{a}.rope.dimension_count": head_dim,
    }
    if config.get("query_pre_attn_scalar"):
        meta[f"{a}.attention.scale"] = 1.0 / math.sqrt(config["query_pre_attn_scalar"])
    if a.startswith("gemma") and config.get("sliding_window"):
        meta[f"{a}.attention.sliding_window"] = config["sliding_window"]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            meta[f"{a}.{key}"] = float(config[key])
    if a == "gemma3":
        meta[f"{a}.rope.freq_base_swa"] = float(config["rope_local_base_freq"])
        pattern = config["sliding_window_pattern"]
        meta[f"{a}.attention.sliding_window_pattern"] = [
            bool((i + 1) % pattern) for i in range(config["num_hidden_layers"])
        ]
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = float(scaling["factor"])
    if a == "phi3":
        meta[f"{a}.rope.scaling.original_context_length"] = config["original_max_position_embeddings"]
    return meta


def _llama3_factors(config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: per-frequency RoPE factors."""
    s = config["rope_scaling"]
    dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_tokenizer(writer: gguf.GGUFWriter, ckpt: Path, pre: str) -> None:
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in specials else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[cfg["bos_token"]])
    writer.add_eos_token_id(vocab[cfg["eos_token"]])
    writer.add_pad_token_id(vocab[cfg["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(cfg["chat_template"])


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def write_reference_checkpoint(ckpt: Path, weights: Mapping[str, np.ndarray], out: Path) -> Path:
    """The fixture checkpoint with ``weights`` swapped in: the model an import must reproduce."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


# ---- raw bytes, for hostile files ----------------------------------------------------------------


def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return len(raw).to_bytes(8, "little") + raw


def raw_kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + (4).to_bytes(4, "little") + value.to_bytes(4, "little")


def raw_tensor_info(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    out = gguf_string(name) + len(dims).to_bytes(4, "little")
    out += b"".join(d.to_bytes(8, "little") for d in dims)
    return out + ggml_type.to_bytes(4, "little") + offset.to_bytes(8, "little")


def raw_gguf(
    kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3, magic: bytes = b"GGUF",
    n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32,
) -> bytes:
    """A GGUF file from pre-encoded metadata entries and tensor infos; counts may lie."""
    head = magic + version.to_bytes(4, "little")
    head += (len(infos) if n_tensors is None else n_tensors).to_bytes(8, "little")
    head += (len(kvs) if n_kv is None else n_kv).to_bytes(8, "little")
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


# ---- sentencepiece-style vocabularies ----------------------------------------------------------------


def spm_vocab(corpus: str, vocab_size: int = 400) -> tuple[list[str], list[float], list[int]]:
    """A llama-style vocab (tokens, scores, types) trained on ``corpus``: <unk> <s> </s>, the 256
    byte tokens, then "▁"-spelled pieces scored so that a piece made by an earlier merge scores higher."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(corpus.splitlines(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    score: dict[str, float] = {}
    for k, merge in enumerate(merges):
        score.setdefault(merge.replace(" ", ""), -float(k))
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, CONTROL, CONTROL, *([6] * 256)]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256)]
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(score.get(piece, -float(len(merges) + i)))
    return tokens, scores, types


def build_spm_tokenizer_gguf(out: Path, arch: str, corpus: str, *, add_space_prefix: bool | None = None) -> Path:
    """A GGUF holding only a llama-style tokenizer (no tensors)."""
    tokens, scores, types = spm_vocab(corpus)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
