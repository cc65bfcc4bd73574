"""Random-weight float32 checkpoints in Hugging Face format, for benchmarks.

Each checkpoint is a folder both mlxserve and mlx-lm load as they are: ``config.json``, safetensors
shards with an index, and a byte-level BPE ``tokenizer.json`` whose vocabulary covers every id the
model can produce (so any sampled id decodes in both libraries). The BPE has no merges: it is only
ever used to *decode*, since the benchmark feeds token ids directly.

Weights are drawn tensor by tensor and written shard by shard, so building the Qwen2.5-0.5B-shaped
checkpoint (about 2 GB in float32) never holds much more than one shard in memory. Built folders are
cached by a hash of their spec; a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

__all__ = ["DEFAULT_CACHE_DIR", "SPECS", "CheckpointSpec", "ensure_checkpoint"]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mlxserve-bench"
_FORMAT_VERSION = 1  # bump when the written files change, so stale caches are rebuilt
_WEIGHT_STD = 0.02
_SHARD_BYTES = 512 * 2**20


@dataclass(frozen=True, slots=True)
class CheckpointSpec:
    name: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6

    def config(self) -> dict:
        """config.json contents. No eos/bos ids: generation must run the full length."""
        config = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.model_type == "qwen2":
            config.update(use_sliding_window=False, sliding_window=self.max_position_embeddings, max_window_layers=0)
        else:
            config.update(attention_bias=self.qkv_bias, mlp_bias=False)
        return config

    def digest(self) -> str:
        blob = json.dumps([_FORMAT_VERSION, _WEIGHT_STD, asdict(self)], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


SPECS: dict[str, CheckpointSpec] = {
    "tiny": CheckpointSpec(
        name="tiny", model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=1024,
        tie_word_embeddings=False, qkv_bias=False, rope_theta=10000.0, max_position_embeddings=2048,
    ),
    "qwen": CheckpointSpec(
        name="qwen2.5-0.5b", model_type="qwen2", hidden_size=896, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, qkv_bias=True, rope_theta=1e6,
        max_position_embeddings=32768,
    ),
}


def ensure_checkpoint(spec: CheckpointSpec, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The folder of ``spec``'s checkpoint under ``cache_dir``, built on first use."""
    folder = Path(cache_dir) / f"{spec.name}-{spec.digest()}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: an interrupted build never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=folder.parent))
    try:
        _write_weights(spec, tmp)
        _write_tokenizer(spec.vocab_size, tmp)
        (tmp / "config.json").write_text(json.dumps(spec.config(), indent=2))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---- weights -------------------------------------------------------------------------------------


def _tensor_shapes(spec: CheckpointSpec) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) in file order; kind is "normal" (random), "ones" (norm weights)."""
    D, F, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q_dim, kv_dim = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    yield "model.embed_tokens.weight", (V, D), "normal"
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (D,), "ones"
        for proj, out_dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            yield f"{p}.self_attn.{proj}.weight", (out_dim, D), "normal"
            if spec.qkv_bias:
                yield f"{p}.self_attn.{proj}.bias", (out_dim,), "normal"
        yield f"{p}.self_attn.o_proj.weight", (D, q_dim), "normal"
        yield f"{p}.post_attention_layernorm.weight", (D,), "ones"
        yield f"{p}.mlp.gate_proj.weight", (F, D), "normal"
        yield f"{p}.mlp.up_proj.weight", (F, D), "normal"
        yield f"{p}.mlp.down_proj.weight", (D, F), "normal"
    yield "model.norm.weight", (D,), "ones"
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", (V, D), "normal"


def _write_weights(spec: CheckpointSpec, folder: Path) -> None:
    """Shards of at most ~_SHARD_BYTES plus model.safetensors.index.json."""
    rng = np.random.default_rng(0)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, shape, kind in _tensor_shapes(spec):
        if kind == "ones":
            tensor = np.ones(shape, dtype=np.float32)
        else:
            tensor = rng.standard_normal(shape, dtype=np.float32)
            tensor *= _WEIGHT_STD
        if sizes[-1] and sizes[-1] + tensor.nbytes > _SHARD_BYTES:
            _flush(shards, folder)
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    _flush(shards, folder)
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i in range(total):
        old = folder / f"part-{i}.safetensors"
        new_name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        old.rename(folder / new_name)
        weight_map.update({k: new_name for k in shards[i]})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _flush(shards: list[dict[str, np.ndarray]], folder: Path) -> None:
    """Write the last shard and keep only its tensor names (to free the arrays)."""
    i = len(shards) - 1
    save_file(shards[i], str(folder / f"part-{i}.safetensors"), metadata={"format": "pt"})
    shards[i] = dict.fromkeys(shards[i])  # names only


# ---- tokenizer -----------------------------------------------------------------------------------


def _write_tokenizer(vocab_size: int, folder: Path) -> None:
    """A byte-level BPE over the 256 byte symbols plus ``vocab_size - 256`` word tokens.

    ByteLevel is the decoder real Qwen/Llama-3 tokenizers use, so mlx-lm picks its fast streaming
    BPE detokenizer and mlxserve its usual incremental path: both libraries decode as they would for
    a real checkpoint of this shape.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte symbols")
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for i in range(len(alphabet), vocab_size):
        vocab["\u0120" + _word(i)] = i  # "Ġ" + word: decodes to " word"
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _word(i: int) -> str:
    """A distinct lowercase word per id (base-26 digits)."""
    letters = []
    while True:
        i, r = divmod(i, 26)
        letters.append(chr(ord("a") + r))
        if i == 0:
            return "".join(reversed(letters))
