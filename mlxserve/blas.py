"""Fast float32 on Linux CPUs: make MLX use OpenBLAS instead of its slow reference BLAS.

MLX's Linux wheel links a reference CBLAS. Preloading OpenBLAS (``LD_PRELOAD``) replaces those
symbols and makes float32 matmuls 5-70x faster. A preload only works at process start, so the CLI
re-executes itself once with it set when OpenBLAS is installed but not loaded
(``MLXSERVE_NO_REEXEC=1`` turns that off), and otherwise tells the user how to get it.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

OPENBLAS_GLOBS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
)
NO_REEXEC_ENV = "MLXSERVE_NO_REEXEC"
INSTALL_HINT = (
    "MLX is using its slow reference BLAS on this CPU; install OpenBLAS for 5-70x faster float32 "
    "(Debian/Ubuntu: sudo apt-get install libopenblas0-pthread) and mlxserve will preload it"
)


def find_openblas() -> str | None:
    """Path of an installed OpenBLAS shared library, or None."""
    for pattern in OPENBLAS_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def openblas_loaded() -> bool:
    """Whether OpenBLAS is mapped into this process (Linux only; False elsewhere)."""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def needs_openblas() -> bool:
    """True on Linux, where MLX runs on the CPU without OpenBLAS."""
    return sys.platform.startswith("linux") and not openblas_loaded()


def reexec_with_openblas(argv: list[str]) -> None:
    """Replace this process with one that preloads OpenBLAS, when that is possible and useful.

    Returns (without doing anything) when not on Linux, already loaded, not installed, disabled, or
    when a previous re-exec already tried.
    """
    if not needs_openblas() or os.environ.get(NO_REEXEC_ENV):
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[NO_REEXEC_ENV] = "1"  # never loop, even if the preload is refused
    os.execve(sys.executable, [sys.executable, "-m", "mlxserve", *argv], env)
