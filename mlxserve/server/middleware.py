"""ASGI guards in front of the routes, outermost first:

    HostGuard (403)  ->  CORS (listed origins only)  ->  APIKeyGuard (401)  ->  BodyGuard (413/415)  ->  routes

Each answers with the OpenAI error envelope (``server/errors.py``) before the request reaches a route.
They are plain ASGI (no BaseHTTPMiddleware), so streaming responses and disconnects pass through.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxserve.errors import (
    AuthenticationError,
    InvalidRequestError,
    MlxServeError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
)
from mlxserve.server.errors import error_response

__all__ = ["APIKeyGuard", "BodyGuard", "HostGuard"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _reject(error: MlxServeError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(error)(scope, receive, send)


def host_name(host_header: str) -> str:
    """The name part of a Host header: "[::1]:8080" -> "::1", "LocalHost:80" -> "localhost"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostGuard:
    """On a loopback bind, answer only requests addressed to a loopback name: a web page whose DNS
    name rebinds to 127.0.0.1 still sends its own name as Host (DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if host is not None and host_name(host) not in self.allowed_hosts:
                return await _reject(PermissionDeniedError("this Host is not allowed"), scope, receive, send)
        await self.app(scope, receive, send)


class APIKeyGuard:
    """``Authorization: Bearer <key>`` on every route but the exempt ones, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, exempt_paths: frozenset[str] = frozenset({"/health"})) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt_paths:
            error = self._check(_header(scope, b"authorization"))
            if error is not None:
                return await _reject(error, scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, authorization: str | None) -> AuthenticationError | None:
        if authorization is None:
            return AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        given = token.encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self._key):
            return AuthenticationError("incorrect API key")
        return None


class BodyGuard:
    """Bodies must be JSON (415) and at most ``max_body_bytes`` (413). A declared Content-Length over
    the limit is refused before reading; a chunked body is cut off as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        error = self._check_headers(scope)
        if error is not None:
            return await _reject(error, scope, receive, send)
        await self.app(scope, self._limited(receive), send)

    def _check_headers(self, scope: Scope) -> MlxServeError | None:
        content_type = _header(scope, b"content-type")
        if content_type is not None:
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                return UnsupportedMediaTypeError("the request body must be JSON (Content-Type: application/json)")
        length = _header(scope, b"content-length")
        if length is not None and not length.strip().isdigit():
            return InvalidRequestError("invalid Content-Length header")
        if length is not None and int(length) > self.max_body_bytes:
            return PayloadTooLargeError(f"the request body is larger than {self.max_body_bytes} bytes")
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI re-raises HTTPException from a body read as it is
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        return limited_receive
