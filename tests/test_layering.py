"""Architecture rules that a grep or an AST walk can check (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the converter may import from the runtime.
CONVERT_MAY_IMPORT = ("mlxserve.errors", "mlxserve.models", "mlxserve.io", "mlxserve.tokenizer", "mlxserve.model_store")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_runtime_never_imports_the_converter():
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "mlxserve").rglob("*.py")
        if p.name != "cli.py" and p.name != "check_install.py"
        for name in _imports(p)
        if name.startswith("mlxserve.convert")
    ]
    assert offenders == []


def test_converter_imports_only_what_it_may():
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "convert").rglob("*.py")
        for name in _imports(p)
        if name.startswith("mlxserve") and not name.startswith(CONVERT_MAY_IMPORT)
    ]
    assert offenders == []


def test_no_host_reads_in_models_or_ops():
    """One host read per generated token, in generation/steps.py; none hidden in model code."""
    pattern = re.compile(r"\.(item|tolist)\(\)")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in ("mlxserve/models", "mlxserve/ops")
        for p in (ROOT / folder).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_linter_contracts_hold():
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
