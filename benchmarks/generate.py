"""Single-stream generation speed: mlxserve vs mlx-lm on the same float32 checkpoint, in one run.

Run it with OpenBLAS preloaded on Linux (MLX's CPU float32 matmuls are several times faster):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/generate.py
    # or
    source scripts/env.sh && python benchmarks/generate.py [--only tiny|qwen] [--repeats 3]

For each checkpoint (random weights, built once and cached, see ``_checkpoints.py``) both libraries
load the same folder, get the same prompt token ids, decode greedily for exactly ``--gen-tokens``
tokens (the checkpoints define no EOS) and are timed the same way, from outside their
``stream_generate`` iterators:

* prompt tok/s = prompt tokens / time to the first response (TTFT, prefill + first sample);
* decode tok/s = (N - 1) / (time of the N-th response - time of the first one).

Both models are loaded twice, once in each order (the model loaded first in a process decoded a few
percent slower on our test VM, whichever library it was). After each load: one warm-up run of each,
then ``--repeats`` timed runs of each, alternated (A B, B A, ...) so slow drifts in machine load hit
both alike. The table shows medians over all 2 x ``--repeats`` runs and the
ratio mlxserve / mlx-lm (> 1 means mlxserve is faster), plus the ratio of the best runs (less
sensitive to other processes on a shared machine). Both runs must produce the same greedy
token ids; a mismatch is reported as a warning (float32 rounding can flip a near-tie).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoints import DEFAULT_CACHE_DIR, SPECS, CheckpointSpec, ensure_checkpoint

DEFAULT_PROMPT_TOKENS = {"tiny": 128, "qwen": 128}
DEFAULT_GEN_TOKENS = {"tiny": 256, "qwen": 64}
LIBRARIES = ("mlxserve", "mlx-lm")


@dataclass(frozen=True, slots=True)
class RunTiming:
    token_ids: tuple[int, ...]
    ttft_s: float  # start -> first response
    decode_s: float  # first response -> last response

    def prompt_tps(self, num_prompt: int) -> float:
        return num_prompt / self.ttft_s

    def decode_tps(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s


@dataclass(frozen=True, slots=True)
class Row:
    checkpoint: str
    metric: str
    mlxserve: float  # median over the timed runs
    mlx_lm: float
    best_ratio: float  # fastest mlxserve run / fastest mlx-lm run

    @property
    def ratio(self) -> float:
        return self.mlxserve / self.mlx_lm


def time_stream(make_stream: Callable[[], Iterable], token_of: Callable[[object], int]) -> RunTiming:
    """Drain one stream, stamping each response as it arrives."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    stamps, tokens = [], []
    start = time.perf_counter()
    for response in make_stream():
        stamps.append(time.perf_counter())
        tokens.append(token_of(response))
    return RunTiming(tuple(tokens), stamps[0] - start, stamps[-1] - stamps[0])


def load_runner(lib: str, folder: Path, prompt_ids: list[int], num_gen: int) -> Callable[[], RunTiming]:
    """Load ``lib``'s model and tokenizer from ``folder``; return a zero-argument timed run."""
    if lib == "mlxserve":
        import mlxserve.api

        model, tokenizer = mlxserve.api.load(folder)
        return lambda: time_stream(
            lambda: mlxserve.api.stream_generate(model, tokenizer, prompt_ids, max_tokens=num_gen, temperature=0.0),
            lambda r: r.token,
        )
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(folder))
    greedy = make_sampler(temp=0.0)
    return lambda: time_stream(
        lambda: mlx_lm.stream_generate(model, tokenizer, prompt_ids, max_tokens=num_gen, sampler=greedy),
        lambda r: r.token,
    )


def bench_checkpoint(key: str, spec: CheckpointSpec, args: argparse.Namespace) -> list[Row]:
    import numpy as np

    num_prompt = args.prompt_tokens or DEFAULT_PROMPT_TOKENS[key]
    num_gen = args.gen_tokens or DEFAULT_GEN_TOKENS[key]
    t0 = time.perf_counter()
    folder = ensure_checkpoint(spec, args.cache_dir)
    print(f"[{spec.name}] checkpoint {folder} ({time.perf_counter() - t0:.1f}s)", flush=True)
    # Ids above the 256 byte symbols: each one is a whole word token in both tokenizers.
    prompt_ids = np.random.default_rng(1).integers(256, spec.vocab_size, num_prompt).tolist()
    timings: dict[str, list[RunTiming]] = {lib: [] for lib in LIBRARIES}
    # Two sessions, each library loaded first in one of them: on the VMs we measured on, the model
    # loaded first decoded a few percent slower whichever library it was (where its weights land
    # in memory), so a single load order would bias the comparison.
    for load_order in (LIBRARIES, LIBRARIES[::-1]):
        runners = {lib: load_runner(lib, folder, prompt_ids, num_gen) for lib in load_order}
        _run_session(spec.name, runners, args.repeats, num_gen, timings)
        del runners
        gc.collect()
    _check_same_tokens(spec.name, timings)
    return _rows(spec.name, timings, num_prompt, num_gen)


def _run_session(name: str, runners: dict, repeats: int, num_gen: int, timings: dict[str, list[RunTiming]]) -> None:
    """One warm-up run of each library, then ``repeats`` timed runs of each, alternating."""
    first = next(iter(runners))
    for lib, run in runners.items():  # warm-up: compile kernels, fault in weights
        _check_length(lib, run(), num_gen)
    for r in range(repeats):
        # A B, B A, A B ...: alternating who goes first cancels slow drifts (thermal, other load).
        for lib in LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]:
            timing = _check_length(lib, runners[lib](), num_gen)
            timings[lib].append(timing)
            print(f"[{name}] loaded first: {first:8s} run {r + 1} {lib:8s} ttft {timing.ttft_s * 1e3:8.1f} ms  "
                  f"decode {timing.decode_tps():8.1f} tok/s", flush=True)


def _check_length(lib: str, timing: RunTiming, num_gen: int) -> RunTiming:
    if len(timing.token_ids) != num_gen:
        raise SystemExit(f"{lib} produced {len(timing.token_ids)} tokens, expected {num_gen}")
    return timing


def _check_same_tokens(name: str, timings: dict[str, list[RunTiming]]) -> None:
    for lib, runs in timings.items():
        if len({t.token_ids for t in runs}) > 1:
            print(f"[{name}] WARNING: {lib}'s greedy tokens changed between runs")
    ours, theirs = timings["mlxserve"][0].token_ids, timings["mlx-lm"][0].token_ids
    if ours == theirs:
        print(f"[{name}] greedy tokens identical ({len(ours)} tokens)")
        return
    first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    print(f"[{name}] WARNING: greedy tokens differ from position {first}: "
          f"mlxserve {list(ours[first:first + 5])} vs mlx-lm {list(theirs[first:first + 5])}")


def _rows(name: str, timings: dict[str, list[RunTiming]], num_prompt: int, num_gen: int) -> list[Row]:
    metrics = {
        f"prompt tok/s ({num_prompt} tok)": lambda t: t.prompt_tps(num_prompt),
        f"decode tok/s ({num_gen} tok)": RunTiming.decode_tps,
    }
    rows = []
    for label, metric in metrics.items():
        ours = [metric(t) for t in timings["mlxserve"]]
        theirs = [metric(t) for t in timings["mlx-lm"]]
        rows.append(Row(name, label, statistics.median(ours), statistics.median(theirs), max(ours) / max(theirs)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ("checkpoint", "metric", "mlxserve", "mlx-lm", "ratio", "ratio (best)")
    cells = [header] + [
        (r.checkpoint, r.metric, f"{r.mlxserve:.1f}", f"{r.mlx_lm:.1f}", f"{r.ratio:.3f}", f"{r.best_ratio:.3f}")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SPECS), help="benchmark one checkpoint only")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library and load order (default 3)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default: 128)")
    parser.add_argument("--gen-tokens", type=int, help="tokens to generate (default: tiny 256, qwen 64)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where checkpoints are cached")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.gen_tokens is not None and args.gen_tokens < 2):
        parser.error("--repeats must be >= 1 and --gen-tokens >= 2")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        parser.error("--prompt-tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if sys.platform == "linux" and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        print("note: OpenBLAS is not preloaded; float32 matmuls will be slow (see the module docstring)")
    rows: list[Row] = []
    for key, spec in SPECS.items():
        if args.only in (None, key):
            rows += bench_checkpoint(key, spec, args)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
