"""From a RequestStream to OpenAI responses: SSE event streams and whole JSON bodies, with exact usage.

Choice ``i`` of a request with ``n`` samples per prompt is sample ``i % n`` of prompt ``i // n``. Usage
counts each prompt once (``prompt_tokens``), its cached part from its first sample (the one that
computed it), and every generated token of every choice, a stop token included.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from mlxserve.engine.async_engine import ChoiceDelta, RequestStream
from mlxserve.server.errors import to_sse_error
from mlxserve.server.sse import DONE, ChatChunks, CompletionChunks
from mlxserve.tokenizer.wrapper import Tokenizer

__all__ = ["Job", "UsageCounter", "chat_events", "collect", "completion_events", "until_disconnect"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Job:
    """What the response needs to know about the request it answers."""

    response_id: str
    created: int
    model: str
    n: int  # samples per prompt
    include_usage: bool = False


@dataclass(slots=True)
class UsageCounter:
    n: int
    prompt_tokens: dict[int, int] = field(default_factory=dict)  # prompt index -> tokens
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, delta: ChoiceDelta) -> None:
        prompt = delta.index // self.n
        self.prompt_tokens[prompt] = delta.num_prompt_tokens
        if delta.index % self.n == 0:
            self.cached_tokens[prompt] = delta.num_cached_tokens
        self.completion_tokens += delta.num_new_tokens

    def to_dict(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
        }


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE token uses -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for, even when it is part of a multi-byte character (which
    ``decode([id])`` would turn into U+FFFD): byte-level BPE and ``<0xNN>`` byte-fallback tokens."""
    (piece,) = tokenizer.convert_ids_to_tokens([token_id])
    if piece is not None:
        match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if match:
            return bytes([int(match.group(1), 16)])
        decoder = _byte_level_decoder()
        if all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def chat_logprobs(tokenizer: Tokenizer, delta: ChoiceDelta) -> list[dict] | None:
    """OpenAI's ``logprobs.content`` entries for a delta's tokens."""
    if delta.logprobs is None:
        return None
    out = []
    for token_id, logprob in zip(delta.token_ids, delta.logprobs):
        raw = token_bytes(tokenizer, token_id)
        token = raw.decode("utf-8", errors="replace")
        out.append({"token": token, "logprob": logprob, "bytes": list(raw), "top_logprobs": []})
    return out


def completion_logprobs(tokenizer: Tokenizer, delta: ChoiceDelta, offset: int) -> dict | None:
    """Legacy completions ``logprobs`` for a delta's tokens; ``offset``: characters of text before it."""
    if delta.logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in delta.token_ids]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": list(delta.logprobs), "top_logprobs": None, "text_offset": offsets}


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None


async def collect(stream: RequestStream, usage: UsageCounter) -> list[ChoiceResult]:
    """Run a stream to its end; every choice's text, tokens and finish reason."""
    choices = [ChoiceResult(i) for i in range(stream.num_choices)]
    async for delta in stream.deltas():
        usage.add(delta)
        choice = choices[delta.index]
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        if delta.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + list(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
    return choices


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Await ``work()`` unless the client disconnects first (then it is cancelled; returns None).
    Non-streaming requests would otherwise keep generating for nobody."""
    worker = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((worker, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    return None if worker.cancelled() else worker.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def chat_events(stream: RequestStream, job: Job, tokenizer: Tokenizer) -> AsyncIterator[str]:
    chunks = ChatChunks(job.response_id, job.created, job.model, include_usage=job.include_usage)
    usage = UsageCounter(job.n)
    try:
        for index in range(stream.num_choices):
            yield chunks.role(index)
        async for delta in stream.deltas():
            usage.add(delta)
            logprobs = chat_logprobs(tokenizer, delta)
            if delta.text or logprobs:
                yield chunks.content(delta.index, delta.text, logprobs)
            if delta.finish_reason is not None:
                yield chunks.finish(delta.index, delta.finish_reason)
        if job.include_usage:
            yield chunks.usage(usage.to_dict())
    except Exception as e:
        yield to_sse_error(e)
    finally:
        stream.close()
    yield DONE


async def completion_events(stream: RequestStream, job: Job, tokenizer: Tokenizer) -> AsyncIterator[str]:
    chunks = CompletionChunks(job.response_id, job.created, job.model, include_usage=job.include_usage)
    usage = UsageCounter(job.n)
    offsets = [0] * stream.num_choices
    try:
        async for delta in stream.deltas():
            usage.add(delta)
            logprobs = completion_logprobs(tokenizer, delta, offsets[delta.index])
            offsets[delta.index] += len(delta.text)
            if delta.text or logprobs:
                yield chunks.text(delta.index, delta.text, logprobs)
            if delta.finish_reason is not None:
                yield chunks.finish(delta.index, delta.finish_reason)
        if job.include_usage:
            yield chunks.usage(usage.to_dict())
    except Exception as e:
        yield to_sse_error(e)
    finally:
        stream.close()
    yield DONE


def chat_body(job: Job, choices: list[ChoiceResult], usage: UsageCounter, tokenizer: Tokenizer) -> dict:
    out = []
    for c in choices:
        logprobs = None
        if c.logprobs is not None:
            delta = ChoiceDelta(c.index, c.text, tuple(c.token_ids), tuple(c.logprobs), None, 0, 0, 0)
            logprobs = {"content": chat_logprobs(tokenizer, delta)}
        out.append({
            "index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs, "finish_reason": c.finish_reason,
        })
    return {
        "id": job.response_id, "object": "chat.completion", "created": job.created, "model": job.model,
        "choices": out, "usage": usage.to_dict(),
    }


def completion_body(job: Job, choices: list[ChoiceResult], usage: UsageCounter, tokenizer: Tokenizer) -> dict:
    out = []
    for c in choices:
        logprobs = None
        if c.logprobs is not None:
            delta = ChoiceDelta(c.index, c.text, tuple(c.token_ids), tuple(c.logprobs), None, 0, 0, 0)
            logprobs = completion_logprobs(tokenizer, delta, 0)
        out.append({"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return {
        "id": job.response_id, "object": "text_completion", "created": job.created, "model": job.model,
        "choices": out, "usage": usage.to_dict(),
    }
