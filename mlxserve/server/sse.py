"""Server-sent events: chunk framing for chat and completions, and the response that carries them.

A chat stream, as OpenAI clients expect it (the same ``id`` on every chunk):

    data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, ...}], ...}
    data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, ...}], ...}        (per new text)
    data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], ...}
    data: {"choices": [], "usage": {...}}                 (only with stream_options.include_usage)
    data: [DONE]

A failure after the headers went out ends the stream with one ``data: {"error": ...}`` and ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "ChatChunks", "CompletionChunks", "SSEResponse", "event"]

DONE = "data: [DONE]\n\n"
logger = logging.getLogger("mlxserve.server")


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Chunks:
    object_name = ""

    def __init__(self, response_id: str, created: int, model: str, *, include_usage: bool) -> None:
        self.response_id = response_id
        self.created = created
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict]) -> str:
        payload = {
            "id": self.response_id, "object": self.object_name, "created": self.created, "model": self.model,
            "choices": choices,
        }
        if self.include_usage:  # OpenAI sends "usage": null on every chunk but the last when asked
            payload["usage"] = None
        return event(payload)

    def usage(self, usage: dict) -> str:
        return event({
            "id": self.response_id, "object": self.object_name, "created": self.created, "model": self.model,
            "choices": [], "usage": usage,
        })


class ChatChunks(_Chunks):
    object_name = "chat.completion.chunk"

    def role(self, index: int) -> str:
        return self._chunk([{
            "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None,
        }])

    def content(self, index: int, text: str, logprobs: list[dict] | None) -> str:
        return self._chunk([{
            "index": index, "delta": {"content": text},
            "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": None,
        }])

    def finish(self, index: int, finish_reason: str) -> str:
        return self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])


class CompletionChunks(_Chunks):
    object_name = "text_completion"

    def text(self, index: int, text: str, logprobs: dict | None) -> str:
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}])

    def finish(self, index: int, finish_reason: str) -> str:
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}])


class SSEResponse(StreamingResponse):
    """A stream that stops as soon as the client goes: it watches for ``http.disconnect`` while it
    writes (whatever ASGI version the server speaks), gives each write ``write_timeout_s`` (a reader
    that stops reading cannot pin a slot), and calls ``on_close`` however it ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterable[str], *, on_close: Callable[[], None], write_timeout_s: float) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def write_then_stop() -> None:
                    await self._write(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(write_then_stop)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            self._on_close()

    async def _write(self, send: Send) -> None:
        try:
            with anyio.fail_after(self._write_timeout_s):
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                with anyio.fail_after(self._write_timeout_s):
                    await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            with anyio.fail_after(self._write_timeout_s):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            logger.warning("stream dropped: the client read nothing for %.0f s", self._write_timeout_s)
        except OSError:  # the client went away (ASGI 2.4 servers raise on send)
            pass
