"""`mlxserve serve`: refuses an unsafe bind before loading anything; starts, serves, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from mlxserve.cli import app
from mlxserve.server.launch import default_served_name

ROOT = Path(__file__).resolve().parents[2]


def test_a_public_bind_without_a_key_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "absent"), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: binding 0.0.0.0 exposes the server beyond this machine: give --api-key, "
        "or pass --insecure-no-auth to serve without one")


def test_default_served_names(tmp_path):
    assert default_served_name(str(tmp_path), tmp_path) == tmp_path.name
    assert default_served_name("org/model", Path("/cache/org--model")) == "org/model"


def test_serve_prints_its_limits_serves_and_exits_0_on_sigterm(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxserve", "serve", "--model", str(ckpt), "--port", str(port), "--kv-memory", "0.01",
         "--max-running", "4", "--max-queue", "2", "--served-model-name", "tiny", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert (r.status_code, r.json()["usage"]["completion_tokens"]) == (200, 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0
    banner = stderr.splitlines()[:4]
    assert banner[0] == f"mlxserve: serving 'tiny' ({ckpt}) at http://127.0.0.1:{port}/v1"
    assert banner[1].startswith("  KV cache: 0.01 GiB, ")
    assert banner[2] == "  limits: 4 running, 2 queued, context 256 tokens, body 8 MiB"
    assert banner[3] == "  auth: none (loopback only); CORS: off"
