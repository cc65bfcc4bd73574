"""The one error tree of mlxserve.

Every error a user can cause is a subclass of :class:`MlxServeError`. Each class carries the HTTP
status and OpenAI error ``type`` the server maps it to, and an optional ``param`` naming the offending
field. The CLI prints ``str(error)`` on one line and exits non-zero; the server turns it into OpenAI
error JSON. Nothing here imports anything: this module is layer 0.
"""

from __future__ import annotations


class MlxServeError(Exception):
    """Base class of every user-facing error."""

    http_status: int = 500
    openai_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        """The OpenAI error envelope's inner object."""
        return {"message": self.message, "type": self.openai_type, "param": self.param, "code": self.code}


class InvalidRequestError(MlxServeError):
    """A request or argument is out of range or malformed."""

    http_status, openai_type = 400, "invalid_request_error"


class ConfigError(InvalidRequestError):
    """A configuration value (CLI flag, config file key) is invalid."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit the model's context."""

    code = "context_length_exceeded"


class ModelNotFoundError(MlxServeError):
    """A model path or repo id that does not exist or cannot be reached."""

    http_status, openai_type, code = 404, "invalid_request_error", "model_not_found"


class ModelLoadError(MlxServeError):
    """A model folder exists but cannot be loaded (bad config, missing or corrupt weights)."""

    http_status, openai_type = 500, "model_load_error"


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture (``model_type``) has no model definition in mlxserve."""


class UnsafeCheckpointError(ModelLoadError):
    """The checkpoint holds only pickle-based weights, which mlxserve refuses to unpickle."""


class CorruptCheckpointError(ModelLoadError):
    """A weight file is truncated, malformed or inconsistent with its index."""


class ConvertError(MlxServeError):
    """A conversion cannot proceed (output exists, bad quantization settings, write failure)."""

    http_status, openai_type = 400, "convert_error"


class HubUnavailableError(ModelNotFoundError):
    """A hub repo id was given but the hub cannot be reached (offline, or network down)."""


class TemplateError(InvalidRequestError):
    """A chat template failed to render (syntax error, sandbox violation, time or size limit)."""


# ---- server-side errors (raised by the API side of the server and its engine facade) -------------


class AuthenticationError(MlxServeError):
    """A request to a key-protected server lacks the right API key."""

    http_status, openai_type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDeniedError(MlxServeError):
    """The request's Host (DNS rebinding guard) or origin is not allowed."""

    http_status, openai_type, code = 403, "invalid_request_error", "forbidden"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""

    http_status, code = 413, "payload_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    """The request body is not JSON."""

    http_status, code = 415, "unsupported_media_type"


class ServiceUnavailableError(MlxServeError):
    """The server cannot take this request now; ``retry_after`` (seconds) goes into the Retry-After header."""

    http_status, openai_type, code = 503, "server_error", "service_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class OverloadedError(ServiceUnavailableError):
    """Every running slot and queue place is taken."""

    code = "server_is_overloaded"


class ModelLoadingError(ServiceUnavailableError):
    """The model is still loading."""

    code = "model_loading"


class ShuttingDownError(ServiceUnavailableError):
    """The server is draining or stopping and admits no new requests."""

    code = "shutting_down"


class EngineDeadError(ServiceUnavailableError):
    """The engine loop has died; the process must be restarted."""

    code = "engine_unavailable"


class EngineStepError(ServiceUnavailableError):
    """The engine step that carried this request failed (e.g. an allocation failure); others go on."""

    code = "generation_failed"
