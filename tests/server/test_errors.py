"""The one mapping of errors to OpenAI's envelope, in HTTP answers and SSE events."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError

from mlxserve.errors import (
    AuthenticationError,
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
)
from mlxserve.server.errors import error_response, to_sse_error, validation_error


def test_overload_is_503_with_retry_after():
    r = error_response(OverloadedError("busy", retry_after=2))
    assert (r.status_code, r.headers["retry-after"]) == (503, "2")
    assert json.loads(r.body) == {"error": {"message": "busy", "type": "server_error", "param": None,
                                            "code": "server_is_overloaded"}}


def test_a_dead_engine_gives_no_retry_hint_and_401_asks_for_bearer():
    assert "retry-after" not in error_response(EngineDeadError("dead", retry_after=None)).headers
    r = error_response(AuthenticationError("no key"))
    assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")


def test_context_length_error_keeps_its_code_and_param():
    body = json.loads(error_response(ContextLengthError("too long", param="messages")).body)
    assert body["error"] == {"message": "too long", "type": "invalid_request_error", "param": "messages",
                             "code": "context_length_exceeded"}


def test_sse_errors_hide_unexpected_exceptions():
    assert to_sse_error(InvalidRequestError("bad", param="x")) == (
        'data: {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": null}}\n\n')
    event = to_sse_error(ValueError("secret at /home/me/model.py"))
    assert json.loads(event[len("data: "):]) == {"error": {"message": "internal server error",
                                                           "type": "internal_error", "param": None, "code": None}}


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "messages", 2, "content", "list[ContentPart]", 1, "text"), "messages[2].content[1].text"),
        (("body", "stop", "str"), "stop"),
        (("body",), None),
    ],
)
def test_validation_errors_name_the_field(loc, param):
    error = validation_error(RequestValidationError([{"loc": loc, "msg": "Input should be valid", "type": "x"}]))
    assert (error.http_status, error.param) == (400, param)
    assert error.message == (f"{param}: Input should be valid" if param else "Input should be valid")


def test_invalid_json_has_no_param():
    error = validation_error(RequestValidationError([{"loc": ("body", 9), "msg": "JSON decode error",
                                                      "type": "json_invalid"}]))
    assert (error.message, error.param) == ("the request body is not valid JSON", None)
