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
import re
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


class _LimitExceeded(BaseException):
    """Raised inside the template's frames when a render limit is hit. A BaseException, so no
    ``except Exception`` in jinja or in a filter can swallow it (a raising trace hook is removed
    by Python, so a swallowed timeout would leave the loop unbounded)."""


_DIGIT_RUNS = re.compile(r"\d+")
# The limits of the render running in this thread/task; hooks on the shared environment read it.
_active_limits: contextvars.ContextVar[RenderLimits] = contextvars.ContextVar("_active_limits")


def _limit() -> int:
    return _active_limits.get(DEFAULT_RENDER_LIMITS).max_output_chars


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > _limit():
        raise _LimitExceeded(f"a value grew past {_limit()} items")
    return value


def _precheck_str_op(name: str, text: str, args: Sequence[Any]) -> None:
    """Refuse a str operation whose result would pass the size limit, before C code allocates it:
    widths (center, zfill, ``%0*d``, ``{:>N}``), ``replace`` growth and ``join`` totals."""
    limit = _limit()
    if any(isinstance(a, int) and a > limit for a in args):
        raise _LimitExceeded(f"a string operation argument exceeds {limit}")
    if name in ("format", "format_map", "%"):
        if any(len(d) > len(str(limit)) or int(d) > limit for d in _DIGIT_RUNS.findall(text)):
            raise _LimitExceeded(f"a format width exceeds {limit}")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        num_hits = text.count(args[0]) if args[0] else len(text) + 1
        if len(text) + num_hits * max(0, len(args[1]) - len(args[0])) > limit:
            raise _LimitExceeded(f"a replace result would exceed {limit} characters")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        if len(text) * len(items) + sum(len(x) for x in items if isinstance(x, str)) > limit:
            raise _LimitExceeded(f"a join result would exceed {limit} characters")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``seq * n``, ``a ** b`` and ``fmt % args`` whose result would be huge, before computing it."""
    limit = _limit()
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                raise _LimitExceeded(f"a repeated sequence would exceed {limit} items")
    elif operator == "**" and isinstance(left, int) and isinstance(right, (int, float)) and abs(left) > 1:
        if right * abs(left).bit_length() > 100_000:
            raise _LimitExceeded("an integer power is too large")
    elif operator == "%" and isinstance(left, str):
        _precheck_str_op("%", left, right if isinstance(right, tuple) else (right,))


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
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in a function
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):  # str.center/zfill/format/replace/join allocate up front
            _precheck_str_op(getattr(method, "__name__", ""), owner, (*args, *kwargs.values()))
        for arg in (*args, *kwargs.values()):
            _check_size(arg)
        return _check_size(super().call(context, obj, *args, **kwargs))

    @staticmethod
    def check_size(value: Any) -> Any:
        return _check_size(value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Same signature and output as transformers' override: no HTML escaping, unicode kept.
    if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
        raise _LimitExceeded("tojson indent is too large")
    text = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _check_size(text)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _guarded_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    """Size-checked versions of the builtin filters that can allocate far more than their input."""
    center, indent, fmt, replace, join = (filters[n] for n in ("center", "indent", "format", "replace", "join"))

    def checked_center(value: Any, width: int = 80) -> str:
        _precheck_str_op("center", "", (width,))
        return center(value, width)

    def checked_indent(value: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
        num_lines = str(value).count("\n") + 1
        pad = width if isinstance(width, int) else len(str(width))
        _precheck_str_op("indent", "", (pad * num_lines + len(str(value)),))
        return indent(value, width, first, blank)

    def checked_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _precheck_str_op("format", str(value), (*args, *kwargs.values()))
        return _check_size(fmt(value, *args, **kwargs))

    @jinja2.pass_eval_context
    def checked_replace(eval_ctx: Any, value: Any, old: str, new: str, count: int | None = None) -> str:
        _precheck_str_op("replace", str(value), (str(old), str(new)))
        return replace(eval_ctx, value, old, new, count)

    @jinja2.pass_eval_context
    def checked_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = _check_size(list(value))
        _precheck_str_op("join", str(d), (items,))
        return _check_size(join(eval_ctx, items, d, attribute))

    return {"center": checked_center, "indent": checked_indent, "format": checked_format,
            "replace": checked_replace, "join": checked_join}


def _template_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
    # A plain function instead of the ``dict`` type, so templates cannot reach type attributes.
    return dict(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _environment() -> _ChatTemplateEnvironment:
    env = _ChatTemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update(_guarded_filters(env.filters))
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = _template_dict
    return env


@functools.lru_cache(maxsize=64)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile (and cache by source text) a chat template. Syntax errors -> TemplateError."""
    try:
        return _environment().from_string(source)
    except _LimitExceeded as e:  # jinja folds constant filter calls at compile time
        raise TemplateError(f"chat template aborted: {e}") from None
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
            if time.monotonic() > deadline:  # also here, in case the trace hook was removed
                raise _LimitExceeded("render time limit exceeded")
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

