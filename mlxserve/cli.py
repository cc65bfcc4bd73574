"""The ``mlxserve`` command line: generate, chat, convert, serve.

Heavy imports (mlx, the converter) happen inside each command so ``mlxserve --help`` is instant.
Every user error ends as one line on stderr and a non-zero exit, never a traceback
(set MLXSERVE_DEBUG=1 to see one).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from mlxserve.errors import MlxServeError

app = typer.Typer(
    name="mlxserve",
    help="Run, serve and fine-tune large language models on Apple Silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 1, 2, 130


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn: Callable) -> Callable:
    """Turn exceptions into one-line messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MlxServeError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("\ninterrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("MLXSERVE_DEBUG"):
                raise
            fail(f"internal error ({type(e).__name__}: {e}); rerun with MLXSERVE_DEBUG=1 for details",
                 EXIT_INTERNAL_ERROR)

    return wrapper


def warn_if_slow_blas() -> None:
    """Say how to get OpenBLAS when MLX runs on a Linux CPU without it."""
    from mlxserve.blas import INSTALL_HINT, needs_openblas

    if needs_openblas():
        typer.echo(f"note: {INSTALL_HINT}", err=True)


MODEL_HELP = "Model folder (Hugging Face or MLX layout), cached model name, or Hugging Face repo id."
DEFAULT_HELP = " Default: SmolLM2-135M-Instruct, converted once into the model cache."


def resolve_model_arg(model: str | None) -> str:
    """The --model value, or the default model (converted into the cache on first use)."""
    if model:
        return model
    from mlxserve.convert.default_model import ensure_default_model
    from mlxserve.progress import byte_progress

    return str(ensure_default_model(progress=byte_progress, log=lambda m: typer.echo(m, err=True)))


@app.command()
@cli_errors
def generate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + DEFAULT_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text, or '-' to read it from stdin."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat", help="Wrap the prompt in the model's chat template (default: when it has one)."
    ),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System message (with --chat)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set with this mass."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalise recent tokens (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same output."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="Cap the KV cache (tokens); older ones rotate out."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Print speed and memory to stderr."),
) -> None:
    """Generate text from a prompt, streamed to stdout; speed and peak memory go to stderr."""
    from mlxserve.api import load, stream_generate

    text = sys.stdin.read() if prompt == "-" else prompt
    warn_if_slow_blas()
    model_obj, tokenizer = load(resolve_model_arg(model))
    use_chat = tokenizer.has_chat_template if chat is None else chat
    if use_chat and not tokenizer.has_chat_template:
        fail("this model has no chat template; drop --chat")
    request = _chat_messages(text, system) if use_chat else text
    last = None
    for response in stream_generate(
        model_obj, tokenizer, request, max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop), max_kv_size=max_kv_size,
    ):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        last = response
    sys.stdout.write("\n")
    if verbose and last is not None:
        _print_stats(last)


def _chat_messages(text: str, system: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def _print_stats(last) -> None:
    typer.echo("=" * 10, err=True)
    typer.echo(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens-per-sec", err=True)
    typer.echo(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens-per-sec", err=True)
    typer.echo(f"Peak memory: {last.peak_memory_gb:.3f} GB", err=True)


@app.command()
@cli_errors
def chat(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + DEFAULT_HELP),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System message for the conversation."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    max_kv_size: Optional[int] = typer.Option(None, "--max-kv-size", help="Cap the KV cache (tokens)."),
) -> None:
    """Interactive multi-turn chat. The KV cache is kept between turns. /reset clears, /exit quits."""
    from mlxserve.chat_session import ChatSession

    from mlxserve.api import load

    warn_if_slow_blas()
    model_obj, tokenizer = load(resolve_model_arg(model))
    if not tokenizer.has_chat_template:
        fail("this model has no chat template, so it cannot chat; use `mlxserve generate`")
    session = ChatSession(
        model_obj, tokenizer, system=system, max_kv_size=max_kv_size,
        sampling=dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed),
    )
    session.run(input_fn=_read_line, write=_write)


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
@cli_errors
def convert(
    source: str = typer.Argument(..., help="Hugging Face model folder or hub repo id."),
    output: Path = typer.Option(..., "--output", "-o", "--mlx-path", help="Folder to create (must not exist)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight: 2, 3, 4, 5, 6 or 8 (affine)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Weights sharing one scale: 32, 64 or 128."),
    q_mode: str = typer.Option("affine", "--q-mode", help="affine, mxfp4, nvfp4 or mxfp8."),
    quant_recipe: Optional[str] = typer.Option(
        None, "--quant-recipe",
        help="Mixed precision: uniform, high-embed, mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6, mixed_4_8, "
        "or a JSON file mapping module-path regexes to {bits, group_size} or false.",
    ),
    no_quantize: bool = typer.Option(False, "--no-quantize", help="Keep full precision (cast with --dtype)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 (default: the source's)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    verify: Optional[bool] = typer.Option(
        None, "--verify/--no-verify", help="Compare output logits with the source (default: for models under 2 GiB)."
    ),
) -> None:
    """Convert a Hugging Face checkpoint to MLX (4-bit by default); loads in mlx-lm too."""
    from mlxserve.convert import ConvertConfig, QuantSpec
    from mlxserve.convert import convert as run_convert
    from mlxserve.progress import byte_progress

    cfg = ConvertConfig(
        source=source, output=output, revision=revision, quantize=not no_quantize,
        quant=QuantSpec(bits=q_bits, group_size=q_group_size, mode=q_mode), recipe=quant_recipe,
        dtype=dtype, overwrite=overwrite, verify=verify,
    )
    report = run_convert(cfg, progress=byte_progress)
    _print_convert_report(report)


def _print_convert_report(report) -> None:
    size_mb = report.output_bytes / 2**20
    quant = report.quantization
    how = f"{quant['bits']}-bit {quant['mode']}, group {quant['group_size']}" if quant else "not quantized"
    overrides = sum(1 for v in (quant or {}).values() if isinstance(v, dict))
    if overrides:
        how += f", {overrides} layers at other widths"
    typer.echo(f"Converted {report.model_type} ({report.num_parameters / 1e6:.1f}M parameters, {how})", err=True)
    typer.echo(f"  {report.bits_per_weight:.2f} bits per weight, {size_mb:.1f} MiB, {report.seconds:.1f} s", err=True)
    if report.verify is not None:
        v = report.verify
        typer.echo(
            f"  verify: max |logit diff| {v.max_abs_diff:.4g}, mean KL {v.mean_kl:.4g}, "
            f"top-1 agreement {v.top1_agreement:.1%} over {v.num_positions} positions", err=True,
        )
    typer.echo(str(report.output))


@app.command()
@cli_errors
def perplexity(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + DEFAULT_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="Plain text file, or JSONL with a \"text\" field per line."),
    context: int = typer.Option(512, "--context", help="Window length in tokens."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Evaluate only the first N tokens."),
    float32: bool = typer.Option(
        True, "--float32/--native-dtype",
        help="Compute in float32, with quantized weights expanded exactly (much faster on CPU).",
    ),
) -> None:
    """Perplexity of a model on a text file (lower is better)."""
    from mlxserve.api import load
    from mlxserve.evaluate import read_eval_tokens, to_float32
    from mlxserve.evaluate import perplexity as run_perplexity

    warn_if_slow_blas()
    model_obj, tokenizer = load(resolve_model_arg(model))
    tokens = read_eval_tokens(data, tokenizer)
    if float32:
        to_float32(model_obj)
    result = run_perplexity(model_obj, tokens, context=context, max_tokens=max_tokens)
    typer.echo(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.4f} nats) over "
               f"{result.num_tokens} tokens in {result.num_windows} windows of {context}")


@app.command("models")
@cli_errors
def models_cmd() -> None:
    """List the models in the mlxserve cache (name, source, size, precision)."""
    from mlxserve.model_store import cache_dir, list_models

    cached = list_models()
    if not cached:
        typer.echo(f"no cached models in {cache_dir()}")
        return
    rows = [("NAME", "SIZE", "PRECISION", "SOURCE")]
    for m in cached:
        precision = f"{m.bits}-bit" if m.bits else (m.dtype or "?")
        rows.append((m.name, f"{m.size_bytes / 2**20:.1f} MiB", precision, m.source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


@app.command("rm")
@cli_errors
def rm_cmd(name: str = typer.Argument(..., help="Name of a cached model (see `mlxserve models`).")) -> None:
    """Remove a model from the mlxserve cache."""
    from mlxserve.model_store import remove_model

    path = remove_model(name)
    typer.echo(f"removed {name} ({path})")


@app.command()
@cli_errors
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + DEFAULT_HELP),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", help="The name clients send as `model` (default: the model folder's name)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; non-loopback needs --api-key."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' on every route but /health."
    ),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Allow a non-loopback bind without a key."),
    max_running: int = typer.Option(64, "--max-running", help="Requests generating at once."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond those; more get 503."),
    kv_memory: float = typer.Option(1.0, "--kv-memory", help="KV cache budget in GiB."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Context cap (default: the model's)."),
    cors_origin: list[str] = typer.Option(
        [], "--cors-origin", help="Browser origin allowed to call the API (repeatable); default: CORS off."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    from mlxserve.engine.async_engine import AsyncEngineConfig
    from mlxserve.engine.core import EngineConfig
    from mlxserve.io.source import resolve_model_path
    from mlxserve.server.config import ServerConfig
    from mlxserve.server.launch import default_served_name, run_server

    def server_config(name: str) -> ServerConfig:
        return ServerConfig(
            served_model_name=name, host=host, port=port, api_key=api_key, insecure_no_auth=insecure_no_auth,
            cors_origins=tuple(cors_origin),
        ).validate()

    server_config(served_model_name or "model")  # refuse a bad bind before loading anything
    engine_config = EngineConfig(kv_memory_gb=kv_memory, max_num_seqs=max_running, max_model_len=max_model_len,
                                 max_num_batched_tokens=max(2048, max_running))
    async_config = AsyncEngineConfig(max_queue=max_queue)
    warn_if_slow_blas()
    model_arg = resolve_model_arg(model)
    path = resolve_model_path(model_arg)
    name = served_model_name or default_served_name(model_arg, path)
    code = run_server(path, server_config(name), engine_config.validate(), async_config.validate(),
                      echo=lambda line: typer.echo(line, err=True), log_level=log_level)
    if code:
        fail("the engine stopped; exiting so a supervisor can restart the server", code)


def main() -> None:
    """Console entry point: preload OpenBLAS on Linux when possible, then run the app."""
    from mlxserve.blas import reexec_with_openblas

    reexec_with_openblas(sys.argv[1:])
    app(prog_name="mlxserve")
