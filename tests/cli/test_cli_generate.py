"""`mlxserve generate` and `mlxserve chat`: what reaches stdout and stderr, and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import mlxserve
from mlxserve.cli import app

runner = CliRunner()


def _run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxserve", *args], capture_output=True, text=True, input=input,
        env={**os.environ, "MLXSERVE_DEBUG": ""}, timeout=120,
    )


def _without_notes(stderr: str) -> str:
    """stderr minus advisory lines (e.g. the OpenBLAS hint on machines without it)."""
    return "\n".join(line for line in stderr.strip().splitlines() if not line.startswith("note: "))


def test_generate_streams_the_api_output_and_reports_speed(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    result = _run("generate", "--model", str(ckpt), "--prompt", "Hello world", "--max-tokens", "12", "--no-chat")
    assert result.returncode == 0, result.stderr
    model, tokenizer = mlxserve.load(ckpt)
    expected = mlxserve.generate(model, tokenizer, "Hello world", max_tokens=12)
    assert result.stdout == expected + "\n"
    lines = _without_notes(result.stderr).splitlines()
    assert lines[1].startswith("Prompt: ") and lines[1].endswith("tokens-per-sec")
    assert lines[2].startswith("Generation: ") and lines[3].startswith("Peak memory: ")


def test_generate_chat_uses_the_template(tiny_ckpt):
    ckpt = tiny_ckpt("qwen2")
    result = runner.invoke(app, ["generate", "-m", str(ckpt), "-p", "Hi", "-n", "6", "--system", "Be kind", "--quiet"])
    assert result.exit_code == 0, result.output
    model, tokenizer = mlxserve.load(ckpt)
    messages = [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"}]
    assert result.stdout == mlxserve.generate(model, tokenizer, messages, max_tokens=6) + "\n"


def test_generate_reads_prompt_from_stdin(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    piped = _run("generate", "-m", str(ckpt), "-p", "-", "-n", "5", "--no-chat", "--quiet", input="Hello world")
    direct = _run("generate", "-m", str(ckpt), "-p", "Hello world", "-n", "5", "--no-chat", "--quiet")
    assert piped.returncode == 0 and piped.stdout == direct.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "error: model folder '/nonexistent/model' does not exist (hub repo ids look like 'org/name')"),
        (["--temp", "-1"], "error: `temperature` must be in [0.0, 100.0], got -1.0"),
        (["--top-p", "0"], "error: `top_p` must be in (0.0, 1.0], got 0.0"),
        (["--max-tokens", "0"], "error: `max_tokens` must be in [1, 2147483648], got 0"),
    ],
)
def test_generate_bad_input_is_one_line(tiny_ckpt, args, message):
    base = ["generate", "--model", str(tiny_ckpt("llama")), "--prompt", "x"]
    result = _run(*base, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert _without_notes(result.stderr) == message
    assert "Traceback" not in result.stderr


def test_chat_keeps_a_conversation(tiny_ckpt):
    ckpt = tiny_ckpt("llama")
    result = runner.invoke(app, ["chat", "-m", str(ckpt), "-n", "5"], input="Hello\nHow are you?\n/reset\nHi\n/exit\n")
    assert result.exit_code == 0, result.output
    model, tokenizer = mlxserve.load(ckpt)
    first = mlxserve.generate(model, tokenizer, [{"role": "user", "content": "Hello"}], max_tokens=5)
    second = mlxserve.generate(
        model, tokenizer,
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
         {"role": "user", "content": "How are you?"}],
        max_tokens=5,
    )
    after_reset = mlxserve.generate(model, tokenizer, [{"role": "user", "content": "Hi"}], max_tokens=5)
    assert result.stdout.count(">> ") == 5
    replies = [part.rstrip("\n") for part in result.stdout.split(">> ")[1:4]]
    assert replies[0] == first and replies[1] == second
    assert "(conversation cleared)" in replies[2]
    assert result.stdout.split(">> ")[4].rstrip("\n") == after_reset


def test_chat_ends_cleanly_on_eof(tiny_ckpt):
    result = runner.invoke(app, ["chat", "-m", str(tiny_ckpt("llama"))], input="")
    assert result.exit_code == 0


def test_help_lists_commands():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("generate", "chat", "convert"):
        assert command in result.stdout
