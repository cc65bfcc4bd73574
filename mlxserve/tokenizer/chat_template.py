"""Render Hugging Face chat templates safely.

Chat templates come from model repos, so they are untrusted code. They run in jinja2's
``ImmutableSandboxedEnvironment`` configured like transformers (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape), plus
two limits transformers lacks:

* time: a per-thread trace hook raises once the deadline passes, on every template line and call, so
  loops without output (``{% for i in range(10**5) %}{% for j in range(10**5) %}``) stop too;
* size: the output is counted while it streams, and every ``~`` / ``+`` / ``*`` result, call result and
  namespace assignment is checked, so doubling strings stop before they eat memory.

NOTE(tokenizer): a template can still allocate up to about one limit's worth of memory in a single
step (e.g. ``'%*d' % (n, 1)``); a render in a subprocess with rlimits would close that, at ~ms cost.
Every failure surfaces as :class:`mlxserve.errors.TemplateError` with a one-line message.
"""

from __future__ import annotations

import contextvars
import functools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from mlxserve.errors import TemplateError

__all__ = ["RenderLimits", "DEFAULT_RENDER_LIMITS", "compile_chat_template", "render_chat_template"]


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """Bounds on one render. ``max_output_chars`` also caps every intermediate string or list."""

    max_seconds: float = 2.0
    max_output_chars: int = 8_000_000


DEFAULT_RENDER_LIMITS = RenderLimits()


class _LimitExceeded(Exception):
    """Raised inside the template's frames when a render limit is hit."""


# The limits of the render running in this thread/task; hooks on the shared environment read it.
_active_limits: contextvars.ContextVar[RenderLimits] = contextvars.ContextVar("_active_limits")


def _check_size(value: Any) -> Any:
    limits = _active_limits.get(DEFAULT_RENDER_LIMITS)
    if isinstance(value, (str, list, tuple, dict)) and len(value) > limits.max_output_chars:
        raise _LimitExceeded(f"a value grew past {limits.max_output_chars} items")
    return value


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``seq * n`` and ``a ** b`` whose result would be huge, before computing it."""
    limit = _active_limits.get(DEFAULT_RENDER_LIMITS).max_output_chars
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                raise _LimitExceeded(f"a repeated sequence would exceed {limit} items")
    if operator == "**" and isinstance(left, int) and isinstance(right, (int, float)) and abs(left) > 1:
        if right * abs(left).bit_length() > 100_000:
            raise _LimitExceeded("an integer power is too large")


class _CheckedCodeGenerator(CodeGenerator):
    """Wrap every ``~`` concatenation in a size check (``environment`` is a global of compiled code)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.check_size(")
        super().visit_Concat(node, frame)
        self.write(")")


class _TemplateNamespace(Namespace):
    """``namespace()`` that refuses dunder-ish names and oversized values."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check_item(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_item(name, value)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_item(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")
        _check_size(value)


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        limit = _active_limits.get(DEFAULT_RENDER_LIMITS).max_output_chars
        # str.center/ljust/zfill/format-width etc. allocate their int argument up front.
        if isinstance(getattr(obj, "__self__", None), str):
            if any(isinstance(a, int) and a > limit for a in (*args, *kwargs.values())):
                raise _LimitExceeded(f"a string method argument exceeds {limit}")
        for arg in (*args, *kwargs.values()):
            _check_size(arg)
        return _check_size(super().call(context, obj, *args, **kwargs))

    @staticmethod
    def check_size(value: Any) -> Any:
        return _check_size(value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Same signature and output as transformers' override: no HTML escaping, unicode kept.
    return _check_size(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _width_checked(filter_func: Any) -> Any:
    @functools.wraps(filter_func)
    def checked(value: Any, width: Any = 80, *args: Any, **kwargs: Any) -> Any:
        lines = str(value).count("\n") + 1
        if isinstance(width, int) and width * lines > _active_limits.get(DEFAULT_RENDER_LIMITS).max_output_chars:
            raise _LimitExceeded("a padding width is too large")
        return _check_size(filter_func(value, width, *args, **kwargs))

    return checked


@functools.lru_cache(maxsize=1)
def _environment() -> _ChatTemplateEnvironment:
    env = _ChatTemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters["center"] = _width_checked(env.filters["center"])
    env.filters["indent"] = _width_checked(env.filters["indent"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=64)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile (and cache by source text) a chat template. Syntax errors -> TemplateError."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template syntax error at line {e.lineno}: {_one_line(e.message)}") from None
    except Exception as e:  # the compiler may fail on exotic input (RecursionError, ...)
        raise TemplateError(f"chat template does not compile: {type(e).__name__}: {_one_line(str(e))}") from None


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    limits: RenderLimits = DEFAULT_RENDER_LIMITS,
    **template_kwargs: Any,
) -> str:
    """Render ``source`` with the same variables transformers passes (messages, tools, documents,
    add_generation_prompt, plus ``template_kwargs`` such as bos_token). Any failure -> TemplateError."""
    template = compile_chat_template(source)
    context = {
        "messages": _plain(_normalize_messages(messages)),
        "tools": _plain(list(tools)) if tools is not None else None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
        **_plain(dict(template_kwargs)),
    }
    token = _active_limits.set(limits)
    try:
        return _render_limited(template, context, limits)
    except _LimitExceeded as e:
        raise TemplateError(f"chat template aborted: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template blocked by the sandbox: {_one_line(str(e))}") from None
    except jinja2.exceptions.TemplateError as e:  # includes raise_exception() and undefined errors
        raise TemplateError(f"chat template error: {_one_line(str(e))}") from None
    except Exception as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}") from None
    finally:
        _active_limits.reset(token)


def _render_limited(template: jinja2.Template, context: dict[str, Any], limits: RenderLimits) -> str:
    deadline = time.monotonic() + limits.max_seconds
    previous_trace = sys.gettrace()
    sys.settrace(_make_tracer(deadline))
    try:
        pieces: list[str] = []
        num_chars = 0
        for piece in template.generate(context):
            num_chars += len(piece)
            if num_chars > limits.max_output_chars:
                raise _LimitExceeded(f"output exceeds {limits.max_output_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous_trace)


def _make_tracer(deadline: float) -> Any:
    """A trace function that raises past ``deadline``: on every call, and on every line of
    compiled-template frames (filename ``<template>``), so tight template loops are caught too."""

    def local_trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _LimitExceeded("render time limit exceeded")
        return local_trace

    def global_trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _LimitExceeded("render time limit exceeded")
        return local_trace if frame.f_code.co_filename == "<template>" else None

    return global_trace


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Drop None-valued keys (OpenAI sends ``content: null`` with tool calls; templates handle a missing
    key better) and alias reasoning fields the way transformers does."""
    normalized = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TemplateError(f"chat messages must be objects, got {type(message).__name__}")
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in ("reasoning_content", "thinking", "reasoning") if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        normalized.append(msg)
    return normalized


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so no caller object with side-effecting
    methods is reachable from the template; anything else becomes a ``<TypeName>`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]

