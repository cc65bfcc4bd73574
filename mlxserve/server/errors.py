"""The one mapping from errors to OpenAI's error envelope, for HTTP answers and in-band SSE events.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

``MlxServeError`` subclasses carry their status, type, param and code. FastAPI's request validation
errors (422 by default) become 400 ``invalid_request_error`` naming the field (``messages[0].role``);
Starlette's HTTP errors (unknown route, wrong method) keep their status. Anything else is a bug: 500
with a fixed message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlxserve.errors import InvalidRequestError, MlxServeError, ServiceUnavailableError
from mlxserve.server.protocol import iter_param_path

__all__ = ["error_response", "install_error_handlers", "to_error_body", "to_sse_error", "validation_error"]

logger = logging.getLogger("mlxserve.server")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}
_INTERNAL = MlxServeError("internal server error")


def to_error_body(error: MlxServeError) -> dict:
    return {"error": error.to_dict()}


def error_response(error: MlxServeError) -> JSONResponse:
    headers = {}
    if isinstance(error, ServiceUnavailableError) and error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(to_error_body(error), status_code=error.http_status, headers=headers)


def to_sse_error(error: BaseException) -> str:
    """The SSE event that ends a stream whose headers are already sent (``[DONE]`` follows it)."""
    if not isinstance(error, MlxServeError):
        logger.error("stream failed: %s: %s", type(error).__name__, error, exc_info=error)
        error = _INTERNAL
    return f"data: {json.dumps(to_error_body(error))}\n\n"


def validation_error(exc: RequestValidationError) -> MlxServeError:
    """The first validation error as a 400 naming its field."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("the request body is not valid JSON")
    param = "".join(f".{p}" if not p.startswith("[") else p for p in iter_param_path(loc)).lstrip(".") or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "field required"
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param)


def http_error(exc: StarletteHTTPException) -> MlxServeError:
    error = MlxServeError(str(exc.detail) if exc.detail else "error", code=_HTTP_CODES.get(exc.status_code))
    error.http_status = exc.status_code
    error.openai_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error


async def _on_mlxserve_error(request: Request, exc: MlxServeError) -> JSONResponse:
    if exc.http_status >= 500 and not isinstance(exc, ServiceUnavailableError):
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    response = error_response(http_error(exc))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(_INTERNAL)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MlxServeError, _on_mlxserve_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
