"""build_app(ServerConfig, AsyncEngine) -> FastAPI: routes, error handlers, guards, lifespan.

The lifespan binds the engine to the server's event loop, starts its thread (a no-op when the
caller started it to wait for the model first) and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from mlxserve import __version__
from mlxserve.engine.async_engine import AsyncEngine
from mlxserve.server.config import LOOPBACK_HOSTNAMES, ServerConfig
from mlxserve.server.errors import install_error_handlers
from mlxserve.server.middleware import APIKeyGuard, BodyGuard, HostGuard
from mlxserve.server.routes import ServerState, router

__all__ = ["build_app"]


def build_app(config: ServerConfig, engine: AsyncEngine) -> FastAPI:
    config.validate()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.bind_loop(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="mlxserve", version=__version__, lifespan=lifespan)
    app.state.mlxserve = ServerState(config=config, engine=engine, tokenizer=engine.tokenizer, created=int(time.time()))
    install_error_handlers(app)
    app.include_router(router)
    # add_middleware wraps: the last added runs first. Order of checks: Host, CORS, key, body.
    app.add_middleware(BodyGuard, max_body_bytes=config.max_body_bytes)
    if config.api_key is not None:
        app.add_middleware(APIKeyGuard, api_key=config.api_key)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"], allow_credentials=False,
        )
    if config.is_loopback:
        app.add_middleware(HostGuard, allowed_hosts=LOOPBACK_HOSTNAMES)
    return app
