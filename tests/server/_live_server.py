"""A real uvicorn on 127.0.0.1 (free port, background thread) serving a tiny random Llama.

``live_server(ckpt, **options)`` starts one; conftest's session-wide ``server`` is shared by the tests
that leave it healthy. Tests that kill the engine start their own; ``slowed_engine`` keeps a stream
running long enough to disconnect from it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import uvicorn

from mlxserve.engine.async_engine import AsyncEngine, AsyncEngineConfig
from mlxserve.engine.core import EngineConfig
from mlxserve.server.app import build_app
from mlxserve.server.config import ServerConfig

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
MAX_BODY_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0


@dataclass
class LiveServer:
    base_url: str
    engine: AsyncEngine
    config: ServerConfig
    uvicorn_server: uvicorn.Server = field(repr=False)

    def client(self, *, api_key: str | None = API_KEY, timeout: float = 10.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def wait_idle(self, timeout: float = 1.0) -> float:
        """Seconds until the engine runs nothing and holds no page; fails after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            m = self.engine.metrics()
            if m is not None and m.num_running == 0 and m.num_waiting == 0 and m.num_pages_used == 0:
                return time.monotonic() - start
            time.sleep(0.01)
        raise AssertionError(f"engine not idle after {timeout} s: {self.engine.metrics()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(
    ckpt, *, api_key: str | None = API_KEY, max_running: int = 4, max_queue: int = 4, max_model_len: int | None = None,
    cors_origins: tuple[str, ...] = (), max_consecutive_failures: int = 3, model_loader: Callable | None = None,
) -> Iterator[LiveServer]:
    engine_config = EngineConfig(kv_memory_gb=0.01, max_num_seqs=max_running, max_model_len=max_model_len,
                                 max_num_batched_tokens=256, max_prefill_chunk=256)
    async_config = AsyncEngineConfig(max_queue=max_queue, max_consecutive_failures=max_consecutive_failures)
    engine = AsyncEngine.from_model_path(ckpt, engine_config, config=async_config)
    if model_loader is not None:
        engine._model_loader = model_loader
    port = _free_port()
    config = ServerConfig(MODEL_NAME, port=port, api_key=api_key, cors_origins=cors_origins,
                          max_body_bytes=MAX_BODY_BYTES)
    server = uvicorn.Server(uvicorn.Config(build_app(config, engine), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine, config, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def slowed_engine(engine: AsyncEngine, seconds_per_step: float) -> Iterator[None]:
    """Make every engine step take at least ``seconds_per_step`` (so a stream is still running)."""
    core = engine.core
    original = core.step

    def slow_step():
        time.sleep(seconds_per_step)
        return original()

    core.step = slow_step
    try:
        yield
    finally:
        del core.step
