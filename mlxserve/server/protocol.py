"""OpenAI request bodies as pydantic models: the only place pydantic meets a request.

Types are strict (``"max_tokens": "10"`` is a 400, not a silent coercion), ranges are OpenAI's, and
``to_sampling_params()`` turns a body into the engine's frozen ``SamplingParams``. Fields OpenAI
documents that we do not honour yet (``tools``, ``response_format``...) are refused with a 400 naming
them; fields nobody documents are accepted and logged (``unknown_fields()``), as OpenAI clients send
vendor extras freely.

Caps (each a 400 with ``param``): n <= 16, top_logprobs <= 20, stop <= 16 strings of <= 256 characters,
logit_bias <= 1024 entries, prompts per completion request <= 16.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlxserve.errors import InvalidRequestError
from mlxserve.sampling.params import SamplingParams

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "StreamOptions"]

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_PROMPTS = 16
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def unknown_fields(self) -> list[str]:
        """Names of fields no model here declares (logged, then ignored)."""
        return sorted(self.model_extra or ())


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class _SamplingFields(OpenAIModel):
    """Fields chat and completions share."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted; only for the caller's own bookkeeping
    # Extensions most OpenAI-compatible servers take.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("`stream_options` needs `stream: true`", param="stream_options")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise InvalidRequestError(f"`stop` allows at most {MAX_STOP} strings", param="stop")

    def _sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keywords for what was given; OpenAI's defaults otherwise (temperature 1)."""
        given = {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
        }
        kwargs = {k: v for k, v in given.items() if v is not None}
        kwargs.setdefault("temperature", 1.0)
        if self.stop is not None:
            kwargs["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.logit_bias:
            kwargs["logit_bias"] = _logit_bias(self.logit_bias)
        return kwargs


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        if not re.fullmatch(r"\d{1,9}", key):
            raise InvalidRequestError(f"`logit_bias` keys must be token ids, got {key[:32]!r}", param="logit_bias")
        out[int(key)] = value
    return out


def _refuse_unsupported(body: BaseModel, names: tuple[str, ...], harmless: dict[str, Any]) -> None:
    """400 for a documented field we cannot honour yet, unless it has its no-op value."""
    for name in names:
        value = getattr(body, name, None)
        if value is None or value is False or value == [] or harmless.get(name, object()) == value:
            continue
        raise InvalidRequestError(f"`{name}` is not supported yet", param=name)


_CHAT_UNSUPPORTED = (
    "response_format", "tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction",
    "web_search_options", "parallel_tool_calls", "chat_template", "chat_template_kwargs",
)
_CHAT_HARMLESS = {"response_format": {"type": "text"}, "tool_choice": "none", "modalities": ["text"]}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Documented by OpenAI, refused until they land (see _CHAT_UNSUPPORTED).
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM-style extensions: a request may not supply template code
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Validated SamplingParams; ``default_max_tokens`` applies when the body gives none."""
        self._check_common()
        _refuse_unsupported(self, _CHAT_UNSUPPORTED, _CHAT_HARMLESS)
        if self.top_logprobs:  # the engine returns the chosen token's logprob only, for now
            raise InvalidRequestError("`top_logprobs` > 0 is not supported yet", param="top_logprobs")
        max_tokens = self.requested_max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return _build_params(
            param, max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0, **self._sampling_kwargs(),
        )

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates take them: text content only (parts joined by newlines)."""
        return [_template_message(i, m) for i, m in enumerate(self.messages)]


def _template_message(i: int, message: ChatMessage) -> dict[str, str]:
    if message.tool_calls:
        raise InvalidRequestError("`tool_calls` in messages are not supported yet", param=f"messages[{i}].tool_calls")
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"content parts of type {part.type[:32]!r} are not supported; send text",
                    param=f"messages[{i}].content[{j}]",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
    out = {"role": role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    return out


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        self._check_common()
        if self.echo:
            raise InvalidRequestError("`echo` is not supported yet", param="echo")
        if self.suffix is not None:
            raise InvalidRequestError("`suffix` is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("`best_of` other than `n` is not supported yet", param="best_of")
        if self.logprobs:
            raise InvalidRequestError("`logprobs` > 0 (top alternatives) is not supported yet", param="logprobs")
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return _build_params(
            "max_tokens", max_tokens=max_tokens, logprobs=self.logprobs is not None, **self._sampling_kwargs()
        )

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or token-id list each (OpenAI's four prompt shapes)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("`prompt` must not be empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequestError(f"`prompt` allows at most {MAX_PROMPTS} prompts per request", param="prompt")
        return prompts


def _build_params(max_tokens_param: str, **kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as e:
        if e.param == "max_tokens" and max_tokens_param != "max_tokens":
            e.param = max_tokens_param
        raise


def iter_param_path(loc: tuple[Any, ...]) -> Iterator[str]:
    """Field names and indices of a pydantic error location, without its union-member tags."""
    for item in loc:
        if isinstance(item, int):
            yield f"[{item}]"
        elif isinstance(item, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item) and item not in _TYPE_TAGS:
            yield item


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "tuple", "json"})
