"""Batched generation: mlxserve's engine vs mlx-lm's ``batch_generate`` on the same float32 checkpoint.

Run it with OpenBLAS preloaded on Linux (MLX's CPU float32 matmuls are several times faster):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python benchmarks/batch.py
    python benchmarks/batch.py --only tiny --levels 1,4,8,16,32 --repeats 10

Flags: ``--only tiny|qwen``, ``--levels 1,4,8,16,32``, ``--repeats N`` (timed runs per level and
library, default 3; also the rounds of sections 2 and 3), ``--prompt-tokens`` / ``--gen-tokens``
(default 64 / 64), ``--ttft-prompt-tokens`` (the newcomer's prompt, default 256),
``--kv-memory-gb`` (mlxserve's KV budget, default 1.0), ``--throughput-only`` (section 1 only),
``--cache-dir``.

Four sections per checkpoint (random weights, no EOS, built once and cached, see ``_checkpoints.py``):

1. **Throughput.** N requests submitted together (N = each of ``--levels``), each a distinct random
   ``--prompt-tokens`` prompt, greedy, exactly ``--gen-tokens`` generated tokens. mlxserve runs
   ``LLM.generate(prompts)``, mlx-lm ``batch_generate(model, tokenizer, prompts)`` with its default
   batch sizes. Aggregate tok/s = N x gen tokens / wall time of the call (prefill included). Every
   run gets fresh prompts (the same for both libraries), so mlxserve's prefix cache never helps.
   One warm-up per level, then ``--repeats`` runs of each, alternating which library goes first.
2. **TTFT under load.** 8 requests decode; a 9th with a ``--ttft-prompt-tokens`` prompt arrives.
   mlxserve is driven step by step through ``EngineCore``; the goal is TTFT <= (the same prompt's
   prefill alone on an idle engine) + (one 8-row decode step). mlx-lm's ``BatchGenerator`` gets the
   same scenario for comparison.
3. **Prefix cache.** A request with a 1,000-token prefix, then a second one sharing it: TTFT of the
   second as a fraction of the first's (goal <= 15%).
4. **KV memory.** The throughput batch at the largest level, just before its last token: bytes of
   KV held per cached token, against 2 x layers x kv_heads x head_dim x dtype size. mlxserve counts
   used pages x page bytes; mlx-lm sums its batch caches' ``nbytes``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoints import DEFAULT_CACHE_DIR, SPECS, CheckpointSpec, ensure_checkpoint

LIBRARIES = ("mlxserve", "mlx-lm")
NUM_DECODING = 8  # background requests of the TTFT-under-load scenario
PREFIX_TOKENS = 1000
BACKGROUND_MAX_TOKENS = 512  # the 8 decoding requests outlive the TTFT measurement
STEPS_PER_ROUND = 8  # decode steps timed before each newcomer of the TTFT scenario


@dataclass(frozen=True, slots=True)
class Loaded:
    """Both libraries' copies of one checkpoint."""

    spec: CheckpointSpec
    llm: object  # mlxserve.LLM
    lm_model: object  # mlx-lm model
    lm_tokenizer: object


@dataclass(frozen=True, slots=True)
class LevelResult:
    checkpoint: str
    num_requests: int
    mlxserve: list[float]  # aggregate tok/s per timed run
    mlx_lm: list[float]
    num_mismatched: int  # requests whose greedy tokens differ between the libraries (first run)

    @property
    def ratio(self) -> float:
        return statistics.median(self.mlxserve) / statistics.median(self.mlx_lm)

    @property
    def best_ratio(self) -> float:
        return max(self.mlxserve) / max(self.mlx_lm)


class PromptSource:
    """Distinct random prompts: ids above the 256 byte symbols, each a whole word in both tokenizers."""

    def __init__(self, vocab_size: int, seed: int = 1) -> None:
        import numpy as np

        self._rng = np.random.default_rng(seed)
        self._vocab_size = vocab_size

    def take(self, num_prompts: int, num_tokens: int) -> list[list[int]]:
        return [self._rng.integers(256, self._vocab_size, num_tokens).tolist() for _ in range(num_prompts)]


def _fresh() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


# ---- 1. throughput ---------------------------------------------------------------------------------


def run_ours(loaded: Loaded, prompts: list[list[int]], num_gen: int) -> tuple[float, list[list[int]]]:
    _fresh()
    start = time.perf_counter()
    results = loaded.llm.generate(prompts, max_tokens=num_gen, temperature=0.0)
    elapsed = time.perf_counter() - start
    return elapsed, [list(r.token_ids) for r in results]


def run_theirs(loaded: Loaded, prompts: list[list[int]], num_gen: int) -> tuple[float, list[list[int]]]:
    from mlx_lm.generate import batch_generate

    _fresh()
    start = time.perf_counter()
    response = batch_generate(loaded.lm_model, loaded.lm_tokenizer, prompts, max_tokens=num_gen, return_token_ids=True)
    elapsed = time.perf_counter() - start
    return elapsed, [list(t) for t in response.token_ids]


def bench_level(loaded: Loaded, source: PromptSource, n: int, args: argparse.Namespace) -> LevelResult:
    runners: dict[str, Callable] = {"mlxserve": run_ours, "mlx-lm": run_theirs}
    tps: dict[str, list[float]] = {lib: [] for lib in LIBRARIES}
    warm = source.take(n, args.prompt_tokens)
    for lib in LIBRARIES:
        runners[lib](loaded, warm, args.gen_tokens)
    mismatched = 0
    for r in range(args.repeats):
        prompts = source.take(n, args.prompt_tokens)
        tokens = {}
        for lib in LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]:
            elapsed, tokens[lib] = runners[lib](loaded, prompts, args.gen_tokens)
            lengths = {len(t) for t in tokens[lib]}
            if lengths != {args.gen_tokens}:
                raise SystemExit(f"{lib} produced {sorted(lengths)} tokens per request, expected {args.gen_tokens}")
            tps[lib].append(n * args.gen_tokens / elapsed)
        if r == 0:
            mismatched = sum(a != b for a, b in zip(tokens["mlxserve"], tokens["mlx-lm"]))
        print(f"[{loaded.spec.name}] n={n:3d} run {r + 1}: mlxserve {tps['mlxserve'][-1]:9.1f} tok/s  "
              f"mlx-lm {tps['mlx-lm'][-1]:9.1f} tok/s", flush=True)
    return LevelResult(loaded.spec.name, n, tps["mlxserve"], tps["mlx-lm"], mismatched)


def format_throughput(results: Sequence[LevelResult]) -> str:
    header = ("checkpoint", "requests", "mlxserve tok/s", "mlx-lm tok/s", "ratio", "ratio (best)", "same tokens")
    cells = [header] + [
        (r.checkpoint, str(r.num_requests), f"{statistics.median(r.mlxserve):.1f}",
         f"{statistics.median(r.mlx_lm):.1f}", f"{r.ratio:.2f}", f"{r.best_ratio:.2f}",
         f"{r.num_requests - r.num_mismatched}/{r.num_requests}")
        for r in results
    ]
    return _table(cells)


def _table(cells: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---- engine helpers (sections 2-4 drive EngineCore step by step) ------------------------------------


def make_engine(loaded: Loaded, **options):
    from mlxserve.engine.core import EngineConfig, EngineCore

    return EngineCore(loaded.llm.model, EngineConfig(**options))


def add(core, request_id: str, prompt: list[int], max_tokens: int) -> None:
    from mlxserve.engine.request import EngineRequest
    from mlxserve.sampling.params import SamplingParams

    core.add_request(EngineRequest(request_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0)))


def step_until_first_token(core, request_id: str) -> float:
    """Step until ``request_id`` gets a token; seconds from now."""
    start = time.perf_counter()
    while True:
        if any(o.request_id == request_id and o.new_token_ids for o in core.step()):
            return time.perf_counter() - start


# ---- 2. TTFT under load ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TtftUnderLoad:
    prefill_alone_s: float  # the newcomer's prompt on an idle engine: one chunk
    decode_step_s: float  # one step of the 8 decoding rows, before the newcomer
    ttft_s: float  # the newcomer's TTFT while the 8 decode
    mlx_lm_step_s: float
    mlx_lm_ttft_s: float

    @property
    def goal_s(self) -> float:
        return self.prefill_alone_s + self.decode_step_s


def ttft_ours(loaded: Loaded, source: PromptSource, args: argparse.Namespace) -> tuple[float, float, float]:
    """(prefill alone, decode step, TTFT under load), medians over ``--repeats`` rounds."""
    core = make_engine(loaded, kv_memory_gb=args.kv_memory_gb, enable_prefix_caching=False,
                       max_prefill_chunk=max(512, args.ttft_prompt_tokens))
    alone = []
    for i in range(args.repeats + 1):  # the first one warms up
        add(core, f"alone-{i}", source.take(1, args.ttft_prompt_tokens)[0], 1)
        alone.append(step_until_first_token(core, f"alone-{i}"))
    for i, prompt in enumerate(source.take(NUM_DECODING, args.prompt_tokens)):
        add(core, f"bg-{i}", prompt, BACKGROUND_MAX_TOKENS)
    while core.scheduler.waiting or any(r.num_output_tokens == 0 for r in core.scheduler.running):
        core.step()
    steps, ttfts = [], []
    for i in range(args.repeats):
        for _ in range(STEPS_PER_ROUND):
            start = time.perf_counter()
            core.step()
            steps.append(time.perf_counter() - start)
        add(core, f"newcomer-{i}", source.take(1, args.ttft_prompt_tokens)[0], 1)
        ttfts.append(step_until_first_token(core, f"newcomer-{i}"))
    return statistics.median(alone[1:]), statistics.median(steps), statistics.median(ttfts)


def ttft_theirs(loaded: Loaded, source: PromptSource, args: argparse.Namespace) -> tuple[float, float]:
    """(decode step, TTFT under load) of mlx-lm's BatchGenerator in the same scenario."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(loaded.lm_model, max_tokens=BACKGROUND_MAX_TOKENS)
    uids = set(gen.insert(source.take(NUM_DECODING, args.prompt_tokens), [BACKGROUND_MAX_TOKENS] * NUM_DECODING))
    seen: set[int] = set()
    while seen != uids:
        seen |= {r.uid for r in gen.next_generated()}
    steps, ttfts = [], []
    for _ in range(args.repeats):
        for _ in range(STEPS_PER_ROUND):
            start = time.perf_counter()
            gen.next_generated()
            steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        (newcomer,) = gen.insert(source.take(1, args.ttft_prompt_tokens), [1])
        while not any(r.uid == newcomer for r in gen.next_generated()):
            pass
        ttfts.append(time.perf_counter() - start)
    gen.close()
    return statistics.median(steps), statistics.median(ttfts)


def bench_ttft(loaded: Loaded, source: PromptSource, args: argparse.Namespace) -> TtftUnderLoad:
    _fresh()
    alone, step, ttft = ttft_ours(loaded, source, args)
    _fresh()
    lm_step, lm_ttft = ttft_theirs(loaded, source, args)
    return TtftUnderLoad(alone, step, ttft, lm_step, lm_ttft)


# ---- 3. prefix cache -------------------------------------------------------------------------------


def bench_prefix(loaded: Loaded, source: PromptSource, args: argparse.Namespace) -> tuple[float, float, int]:
    """(first TTFT, second TTFT, cached tokens of the second), medians over ``--repeats`` fresh prefixes."""
    _fresh()
    core = make_engine(loaded, kv_memory_gb=args.kv_memory_gb)
    firsts, seconds, cached = [], [], 0
    for r in range(args.repeats + 1):  # the first round warms up
        prefix = source.take(1, PREFIX_TOKENS)[0]
        suffixes = source.take(2, 24)
        add(core, f"p{r}-a", prefix + suffixes[0], 1)
        first = step_until_first_token(core, f"p{r}-a")
        add(core, f"p{r}-b", prefix + suffixes[1], 1)
        second = step_until_first_token(core, f"p{r}-b")
        cached = core.metrics().prefix_cache_hit_tokens
        if r:
            firsts.append(first)
            seconds.append(second)
    hits_per_round = cached // (args.repeats + 1)
    return statistics.median(firsts), statistics.median(seconds), hits_per_round


# ---- 4. KV memory ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KvMemory:
    theory: int  # 2 x layers x kv_heads x head_dim x dtype size
    slot_bytes: float  # arena bytes / page slots
    arena_bytes: int
    ours_bytes: int  # used pages x page bytes
    ours_tokens: int
    theirs_bytes: int
    theirs_tokens: int


def kv_ours(loaded: Loaded, prompts: list[list[int]], num_gen: int, kv_memory_gb: float) -> tuple[int, int, object]:
    """(bytes of the pages in use, tokens whose KV they hold, the store) once a request has num_gen - 1 tokens."""
    core = make_engine(loaded, kv_memory_gb=kv_memory_gb, enable_prefix_caching=False)
    for i, prompt in enumerate(prompts):
        add(core, f"m{i}", prompt, num_gen)
    # Just before the first request finishes: every request is still running and holds its pages.
    while core.scheduler.waiting or max(r.num_output_tokens for r in core.scheduler.running) < num_gen - 1:
        core.step()
    tokens = sum(r.num_computed_tokens for r in core.scheduler.running)
    page_bytes = core.store.layout.bytes_per_token * core.store.page_size
    return core.metrics().num_pages_used * page_bytes, tokens, core.store


def kv_theirs(loaded: Loaded, prompts: list[list[int]], num_gen: int) -> tuple[int, int]:
    """The same moment in mlx-lm's BatchGenerator: (bytes of every batch cache, tokens they hold)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(loaded.lm_model, max_tokens=num_gen)
    uids = gen.insert(prompts, [num_gen] * len(prompts))
    counts: dict[int, int] = {}
    while len(counts) < len(prompts) or max(counts.values()) < num_gen - 1:
        for r in gen.next_generated():
            counts[r.uid] = counts.get(r.uid, 0) + 1
    # A row's cache holds its prompt and every token it has returned (each is fed as it is returned).
    tokens = sum(len(p) + counts[uid] for uid, p in zip(uids, prompts))
    nbytes = gen.prompt_cache_nbytes
    gen.close()
    return nbytes, tokens


def bench_kv(loaded: Loaded, source: PromptSource, args: argparse.Namespace) -> KvMemory:
    n = max(args.levels)
    prompts = source.take(n, args.prompt_tokens)
    _fresh()
    ours_bytes, ours_tokens, store = kv_ours(loaded, prompts, args.gen_tokens, args.kv_memory_gb)
    theory = store.layout.bytes_per_token
    slot_bytes = store.nbytes / (store.num_pages * store.page_size)
    arena = store.nbytes
    del store
    _fresh()
    theirs_bytes, theirs_tokens = kv_theirs(loaded, prompts, args.gen_tokens)
    return KvMemory(theory, slot_bytes, arena, ours_bytes, ours_tokens, theirs_bytes, theirs_tokens)


# ---- report ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extras:
    checkpoint: str
    ttft: TtftUnderLoad
    prefix: tuple[float, float, int]  # first TTFT, second TTFT, tokens hit
    kv: KvMemory


def format_extras(extras: Sequence[Extras]) -> str:
    ms = 1e3
    ttft = [("checkpoint", "prefill alone ms", "8-row step ms", "goal ms", "mlxserve TTFT ms", "/ goal",
             "mlx-lm TTFT ms", "mlx-lm step ms")] + [
        (e.checkpoint, f"{e.ttft.prefill_alone_s * ms:.1f}", f"{e.ttft.decode_step_s * ms:.1f}",
         f"{e.ttft.goal_s * ms:.1f}", f"{e.ttft.ttft_s * ms:.1f}", f"{e.ttft.ttft_s / e.ttft.goal_s:.2f}",
         f"{e.ttft.mlx_lm_ttft_s * ms:.1f}", f"{e.ttft.mlx_lm_step_s * ms:.1f}")
        for e in extras
    ]
    prefix = [("checkpoint", "shared prefix", "tokens hit", "first TTFT ms", "second TTFT ms", "second / first")] + [
        (e.checkpoint, str(PREFIX_TOKENS), str(e.prefix[2]), f"{e.prefix[0] * ms:.1f}", f"{e.prefix[1] * ms:.1f}",
         f"{e.prefix[1] / e.prefix[0]:.1%}")
        for e in extras
    ]
    kv = [("checkpoint", "theory B/token", "arena B/slot", "mlxserve B/token", "x theory", "mlx-lm B/token",
           "x theory", "tokens (ours, mlx-lm)")] + [
        (e.checkpoint, str(e.kv.theory), f"{e.kv.slot_bytes:.0f}", f"{e.kv.ours_bytes / e.kv.ours_tokens:.0f}",
         f"{e.kv.ours_bytes / e.kv.ours_tokens / e.kv.theory:.3f}", f"{e.kv.theirs_bytes / e.kv.theirs_tokens:.0f}",
         f"{e.kv.theirs_bytes / e.kv.theirs_tokens / e.kv.theory:.3f}", f"{e.kv.ours_tokens}, {e.kv.theirs_tokens}")
        for e in extras
    ]
    return "\n\n".join(_table(t) for t in (ttft, prefix, kv))


def load_both(spec: CheckpointSpec, args: argparse.Namespace) -> Loaded:
    import mlx_lm

    import mlxserve

    folder = ensure_checkpoint(spec, args.cache_dir)
    print(f"[{spec.name}] checkpoint {folder}", flush=True)
    llm = mlxserve.LLM(folder, kv_memory_gb=args.kv_memory_gb)
    model, tokenizer = mlx_lm.load(str(folder))
    return Loaded(spec, llm, model, tokenizer)


def bench_checkpoint(spec: CheckpointSpec, args: argparse.Namespace) -> tuple[list[LevelResult], Extras | None]:
    loaded = load_both(spec, args)
    source = PromptSource(spec.vocab_size)
    results = [bench_level(loaded, source, n, args) for n in args.levels]
    if args.throughput_only:
        return results, None
    ttft = bench_ttft(loaded, source, args)
    prefix = bench_prefix(loaded, source, args)
    kv = bench_kv(loaded, source, args)
    return results, Extras(spec.name, ttft, prefix, kv)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SPECS), help="benchmark one checkpoint only")
    parser.add_argument("--levels", default="1,4,8,16,32", help="concurrent requests (default 1,4,8,16,32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per level and library (default 3)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--ttft-prompt-tokens", type=int, default=256, help="newcomer prompt (default 256)")
    parser.add_argument("--kv-memory-gb", type=float, default=1.0, help="mlxserve KV budget (default 1.0)")
    parser.add_argument("--throughput-only", action="store_true", help="skip TTFT, prefix and memory")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where checkpoints are cached")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        parser.error("--levels takes comma-separated integers")
    if min(args.levels) < 1 or args.repeats < 1 or args.gen_tokens < 2 or args.prompt_tokens < 1:
        parser.error("--levels, --repeats, --prompt-tokens must be >= 1 and --gen-tokens >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if sys.platform == "linux" and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        print("note: OpenBLAS is not preloaded; float32 matmuls will be slow (see the module docstring)")
    results: list[LevelResult] = []
    extras: list[Extras] = []
    for key, spec in SPECS.items():
        if args.only in (None, key):
            level_results, extra = bench_checkpoint(spec, args)
            results += level_results
            extras += [extra] if extra is not None else []
    print()
    print(format_throughput(results))
    if extras:
        print()
        print(format_extras(extras))


if __name__ == "__main__":
    main()
