"""The interactive chat loop behind ``mlxserve chat``: one conversation, one KV cache kept across turns."""

from __future__ import annotations

from typing import Any, Callable

import mlx.nn as nn

from mlxserve.generation.generate import stream_generate
from mlxserve.generation.prompt_cache import PromptCache
from mlxserve.tokenizer.wrapper import Tokenizer

COMMANDS_HELP = "Type a message. /reset starts over, /exit (or Ctrl-D) quits."


class ChatSession:
    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, *, system: str | None = None,
        max_kv_size: int | None = None, sampling: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.sampling = dict(sampling or {})
        self.cache = PromptCache(model, max_kv_size=max_kv_size)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, write: Callable[[str], None]) -> str:
        """Stream the assistant's reply to ``write``; the turn is added to the conversation."""
        self.messages.append({"role": "user", "content": user_text})
        parts = []
        for response in stream_generate(
            self.model, self.tokenizer, self.messages, prompt_cache=self.cache, **self.sampling
        ):
            write(response.text)
            parts.append(response.text)
        text = "".join(parts)
        self.messages.append({"role": "assistant", "content": text})
        return text

    def run(self, input_fn: Callable[[str], str | None], write: Callable[[str], None]) -> None:
        write(COMMANDS_HELP + "\n")
        while True:
            line = input_fn(">> ")
            if line is None or line.strip() in ("/exit", "/quit"):
                write("\n")
                return
            if line.strip() == "/reset":
                self.reset()
                write("(conversation cleared)\n")
                continue
            if not line.strip():
                continue
            self.reply(line, write)
            write("\n")
