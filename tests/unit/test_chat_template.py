"""Sandboxed chat-template rendering: transformers parity, sandbox escapes, time and size limits."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlxserve.errors import TemplateError
from mlxserve.tokenizer.chat_template import RenderLimits, compile_chat_template, render_chat_template

# Exercises what real templates use: namespace, loop controls, tojson, tools, raise_exception, strip.
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages if m.role == 'system' %}{% set ns.system = m.content %}{% endfor -%}
{{ bos_token }}
{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}
{%- if ns.system %}[SYS]{{ ns.system | trim }}[/SYS]{% endif %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' ~ m.role) }}{% endif %}
  <{{ m.role }}>{{ m.content }}</{{ m.role }}>
  {%- if loop.index > 10 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<assistant>{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Hi 😀 <b>&</b> \"quoted\""},
    {"role": "assistant", "content": "你好"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": {"type": "string"}}}}]


def test_matches_transformers_rendering() -> None:
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    for tools in (None, TOOLS):
        for add_generation_prompt in (True, False):
            ours = render_chat_template(
                RICH_TEMPLATE, MESSAGES, tools=tools, add_generation_prompt=add_generation_prompt, bos_token="<s>"
            )
            theirs = render_jinja_template(
                conversations=[MESSAGES], tools=tools, chat_template=RICH_TEMPLATE,
                add_generation_prompt=add_generation_prompt, bos_token="<s>",
            )[0][0]
            assert ours == theirs


def test_exact_rendering() -> None:
    out = render_chat_template(RICH_TEMPLATE, MESSAGES, tools=TOOLS, bos_token="<s>")
    assert out == (
        '<s><tools>[{"type": "function", "function": {"name": "get_weather", '
        '"parameters": {"city": {"type": "string"}}}}]'
        '</tools>[SYS]Be brief.[/SYS]  <user>Hi 😀 <b>&</b> "quoted"</user>  <assistant>你好</assistant><assistant>'
    )


def test_messages_are_plain_data() -> None:
    class Secret:
        def delete_everything(self) -> None:  # must not be reachable from a template
            raise AssertionError

    messages = [{"role": "user", "content": "x", "tool_calls": None, "obj": Secret()}]
    template = "{{ messages[0].obj }}|{{ 'tool_calls' in messages[0] }}|{{ messages[0].obj.delete_everything }}"
    assert render_chat_template(template, messages) == "<Secret>|False|"


def test_strftime_now_and_raise_exception() -> None:
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == time.strftime("%Y")
    with pytest.raises(TemplateError, match="chat template error: only user roles"):
        render_chat_template("{{ raise_exception('only user roles') }}", [])


def test_compile_is_cached_and_syntax_errors_are_template_errors() -> None:
    assert compile_chat_template(RICH_TEMPLATE) is compile_chat_template(RICH_TEMPLATE)
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        render_chat_template("ok\n{% for %}", [])


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
        "{{ joiner.__init__.__globals__['os'].system('touch CANARY') }}",
        "{{ namespace.__init__.__globals__.os.popen('touch CANARY') }}",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
        "{{ lipsum.__globals__['os'].popen('touch CANARY').read() }}",
        "{{ ('{0.__class__.__mro__[1]}'|attr('format'))('') }}",
        "{{ '{0.__class__.__mro__}'.format('') }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ dict.__class__ }}{{ dict.mro() }}",
        "{{ messages.append('x') }}",
    ],
)
def test_sandbox_escapes_are_refused(payload: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError) as info:
        render_chat_template(payload, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "CANARY").exists()


def test_huge_range_is_refused_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(TemplateError):
        render_chat_template("{% for i in range(10**9) %}x{% endfor %}", [])
    assert time.monotonic() - start < 3.0


def test_time_limit_stops_a_silent_loop() -> None:
    # No output and no calls inside: only the per-line deadline check can stop this (10**10 iterations).
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(TemplateError, match="time limit"):
        render_chat_template(template, [], limits=RenderLimits(max_seconds=0.3))
    assert time.monotonic() - start < 1.5


def test_time_limit_stops_recursion_bombs() -> None:
    template = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    start = time.monotonic()
    with pytest.raises(TemplateError, match="time limit"):
        render_chat_template(template, [], limits=RenderLimits(max_seconds=0.3))
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize(
    "template",
    [
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
        "{{ d('a', 60) }}",
        "{{ 'a' * 10**10 }}",
        "{{ ['a'] * 10**10 }}",
        "{{ 'a'|center(10**10) }}",
        "{{ 'a'.ljust(10**10) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%0*d' % (10**10, 1) }}",
        "{{ '{:>9999999999}'.format(1) }}",
        "{{ '%0999999999d'|format(1) }}",
        "{{ ('x' * 1000000)|replace('x', 'xxxxxxxxxxxx') }}",
        "{{ (['x' * 1000000] * 1000)|join }}",
        "{{ ''.join(['x' * 1000000] * 1000) }}",
        "{{ ('x\n' * 1000)|indent(100000) }}",
        "{{ messages|tojson(indent=10**9) }}",
        "{% for i in range(100000) %}{% for j in range(1000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    ],
)
def test_size_limits(template: str) -> None:
    start = time.monotonic()
    with pytest.raises(TemplateError, match="aborted"):
        render_chat_template(template, [], limits=RenderLimits(max_seconds=5.0, max_output_chars=2_000_000))
    assert time.monotonic() - start < 2.0


def test_output_limit_is_exact() -> None:
    limits = RenderLimits(max_output_chars=10)
    assert render_chat_template("{{ 'x' * 10 }}", [], limits=limits) == "x" * 10
    with pytest.raises(TemplateError, match="output exceeds 10 characters"):
        render_chat_template("{% for i in range(11) %}x{% endfor %}", [], limits=limits)


def test_trace_hook_is_restored() -> None:
    before = sys.gettrace()
    render_chat_template("{% for i in range(3) %}{{ i }}{% endfor %}", [])
    with pytest.raises(TemplateError):
        render_chat_template("{{ raise_exception('x') }}", [])
    assert sys.gettrace() is before


def test_renders_in_worker_threads_keep_their_own_limits() -> None:
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with ThreadPoolExecutor(max_workers=2) as pool:
        bad = pool.submit(render_chat_template, slow, [], limits=RenderLimits(max_seconds=0.3))
        good = [pool.submit(render_chat_template, "{{ messages|length }}", [{"role": "user"}]) for _ in range(20)]
        assert [f.result() for f in good] == ["1"] * 20
        with pytest.raises(TemplateError, match="time limit"):
            bad.result()
