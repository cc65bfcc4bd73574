"""Run the server in this process: load the model on the engine thread, print what is served, run uvicorn.

``mlxserve serve`` calls ``run_server``; it returns the process exit code (non-zero when the engine
died, so a supervisor restarts the server).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from mlxserve.engine.async_engine import AsyncEngine, AsyncEngineConfig
from mlxserve.engine.core import EngineConfig
from mlxserve.server.config import ServerConfig
from mlxserve.tokenizer.wrapper import Tokenizer

__all__ = ["default_served_name", "run_server"]

EXIT_ENGINE_DIED = 3


def default_served_name(model_arg: str, path: Path) -> str:
    """The name clients send as ``model``: the repo id as given, else the model folder's name."""
    return model_arg if not Path(model_arg).expanduser().is_dir() and "/" in model_arg else path.name


def run_server(
    path: Path, server_config: ServerConfig, engine_config: EngineConfig, async_config: AsyncEngineConfig,
    *, echo: Callable[[str], None], log_level: str = "info",
) -> int:
    import uvicorn

    from mlxserve.server.app import build_app

    server_config.validate()
    died = []
    server_box: list[uvicorn.Server] = []

    def on_death() -> None:
        died.append(True)
        for server in server_box:
            server.should_exit = True

    tokenizer = Tokenizer.from_pretrained(path)
    engine = AsyncEngine.from_model_path(path, engine_config, tokenizer, async_config, on_death=on_death)
    engine.start()
    engine.wait_loaded()
    _print_banner(echo, path, server_config, engine)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = build_app(server_config, engine)
    server = uvicorn.Server(uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=log_level, timeout_graceful_shutdown=10,
    ))
    server_box.append(server)
    # uvicorn re-raises the signal it stopped on once it is done; a no-op handler makes SIGTERM exit 0.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return EXIT_ENGINE_DIED if died else 0


def _print_banner(echo: Callable[[str], None], path: Path, config: ServerConfig, engine: AsyncEngine) -> None:
    echo(f"mlxserve: serving {config.served_model_name!r} ({path}) at {config.url}/v1")
    echo(f"  {engine.description}")
    echo(
        f"  limits: {engine.max_running} running, {engine.config.max_queue} queued, "
        f"context {engine.max_model_len} tokens, body {config.max_body_bytes / 2**20:.0f} MiB"
    )
    auth = "API key required" if config.api_key else "none" + (" (loopback only)" if config.is_loopback else "")
    echo(f"  auth: {auth}; CORS: {', '.join(config.cors_origins) or 'off'}")
