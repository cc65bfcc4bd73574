"""Fixtures of the server tests: one shared live server, its clients, the reference model."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from _live_server import START_TIMEOUT_S, LiveServer, live_server


@pytest.fixture(scope="session")
def ckpt(tiny_ckpt):
    return tiny_ckpt("llama")


@pytest.fixture(scope="session")
def server(ckpt) -> Iterator[LiveServer]:
    with live_server(ckpt) as s:
        s.engine.wait_loaded(timeout=START_TIMEOUT_S)
        yield s


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def reference(ckpt):
    """The same checkpoint loaded for mlxserve.generate: (model, tokenizer)."""
    import mlxserve

    return mlxserve.load(ckpt)
