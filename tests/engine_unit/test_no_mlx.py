"""The scheduler and KV bookkeeping are layer L1: importing them must not import mlx."""

from __future__ import annotations

import subprocess
import sys

L1_MODULES = (
    "mlxserve.kv.hashing",
    "mlxserve.kv.block_pool",
    "mlxserve.kv.manager",
    "mlxserve.engine.config",
    "mlxserve.engine.metrics",
    "mlxserve.engine.request",
    "mlxserve.engine.scheduler",
)


def test_engine_core_modules_do_not_import_mlx():
    code = (
        "import importlib, sys\n"
        f"for name in {L1_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
