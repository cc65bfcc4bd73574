"""``python -m mlxserve.check_install``: prove an installation is whole.

Checks that the converter and the Metal kernel sources are installed inside the package, that the
CLI entry point answers ``--help``, and prints where each was found. Exits non-zero on a problem.
"""

from __future__ import annotations

import importlib
import importlib.resources
import shutil
import subprocess
import sys


def main() -> int:
    problems = []
    for name in ("mlxserve.convert", "mlxserve.convert.pipeline", "mlxserve.metal_kernels", "mlxserve.models.loader"):
        try:
            module = importlib.import_module(name)
            print(f"ok  {name}: {module.__file__}")
        except ImportError as e:
            problems.append(f"{name} cannot be imported: {e}")
    kernels = importlib.resources.files("mlxserve.metal_kernels")
    if not kernels.joinpath("README.md").is_file():
        problems.append("metal_kernels/README.md is missing from the installed package")
    else:
        print(f"ok  kernel folder: {kernels}")
    exe = shutil.which("mlxserve")
    if exe is None:
        problems.append("the `mlxserve` command is not on PATH")
    else:
        result = subprocess.run([exe, "--help"], capture_output=True, text=True)
        if result.returncode != 0 or "convert" not in result.stdout:
            problems.append(f"`mlxserve --help` failed: {result.stderr.strip()[:200]}")
        else:
            print(f"ok  {exe} --help")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
