"""Session-wide test fixtures. Markers (metal, slow) are registered in pyproject.toml."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# tests/ has no __init__.py; putting it on sys.path lets any test import `fixtures.*`.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fixtures.checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: tiny_ckpt(arch, style="classic", via="hand", **kw) -> checkpoint folder.

    Each distinct argument set is built once per session (kw: tie_word_embeddings, seed, shards).
    Treat the folder as read-only: other tests share it.
    """
    built: dict[tuple, Path] = {}

    def build(arch: str, style: str = "classic", via: str = "hand", **kw) -> Path:
        key = (arch, style, via, tuple(sorted(kw.items())))
        if key not in built:
            out_dir = tmp_path_factory.mktemp(f"ckpt-{arch}-{style}-{via}")
            built[key] = build_checkpoint(arch, out_dir, style=style, via=via, **kw)
        return built[key]

    return build
