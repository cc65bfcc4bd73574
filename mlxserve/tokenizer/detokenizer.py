"""Incremental detokenization with stop strings.

Text is produced by decoding a small window of tokens per step (vLLM's prefix/read offsets):

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                 \\__ context already emitted __/\\__ new tokens __/

    delta = decode(ids[prefix_offset:]) - decode(ids[prefix_offset:read_offset])

Decoding with a few tokens of context keeps word-boundary spaces right (sentencepiece drops the
leading space of a decode), and the window stays a few tokens long, so each step costs O(1) rather
than O(tokens so far). Text whose last character is U+FFFD (an incomplete UTF-8 sequence split across
byte tokens) is held back until the next token completes it, or until ``finish()``.

Stop strings: the last ``max(len(stop)) - 1`` characters stay held back, so no part of a stop string
is ever emitted before we know whether it completes. When several stop strings match, the one that
ends first wins (ties: the one that starts first); that is what a token-by-token stream sees first,
so the result does not depend on how tokens are batched into ``update`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlxserve.tokenizer.wrapper import Tokenizer

__all__ = ["IncrementalDetokenizer", "TextDelta"]

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text since the previous delta. ``stop_string`` is set on the delta where a stop string
    matched; ``text`` then ends right before it, and every later delta is empty."""

    text: str
    stop_string: str | None = None


_EMPTY = TextDelta("")


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas. Not thread-safe: one per request.

    Invariant (no stop match): ``"".join(deltas) + finish().text == tokenizer.decode(ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._hold_back = max((len(s) for s in self._stop), default=1) - 1
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending = ""  # decoded text not yet emitted (the stop-string hold-back)
        self._stop_string: str | None = None
        self._finished = False

    @property
    def token_ids(self) -> Sequence[int]:
        return tuple(self._token_ids)

    @property
    def stop_string(self) -> str | None:
        """The stop string that matched, if any."""
        return self._stop_string

    @property
    def is_done(self) -> bool:
        """True after a stop string matched or ``finish()`` ran; further updates return ""."""
        return self._finished or self._stop_string is not None

    def update(self, new_token_ids: Sequence[int]) -> TextDelta:
        """Add generated tokens; return the text that is now safe to emit."""
        if self.is_done:
            return _EMPTY
        self._token_ids.extend(new_token_ids)
        self._pending += self._decode_new(flush=False)
        return self._emit(final=False)

    def finish(self) -> TextDelta:
        """End of generation: flush held-back bytes and characters (a stop string may still match)."""
        if self.is_done:
            return _EMPTY
        self._pending += self._decode_new(flush=True)
        delta = self._emit(final=True)
        self._finished = True
        return delta

    def _decode_new(self, *, flush: bool) -> str:
        """Text of the tokens after ``read_offset``; "" while it ends in an incomplete character."""
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if not flush and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or a UTF-8 sequence still waits for its next byte token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""

    def _emit(self, *, final: bool) -> TextDelta:
        match = self._find_stop()
        if match is not None:
            start, stop = match
            text, self._pending, self._stop_string = self._pending[:start], "", stop
            return TextDelta(text, stop)
        num_ready = len(self._pending) if final else max(0, len(self._pending) - self._hold_back)
        text, self._pending = self._pending[:num_ready], self._pending[num_ready:]
        return TextDelta(text) if text else _EMPTY

    def _find_stop(self) -> tuple[int, str] | None:
        """(start, stop) of the stop string that ends first in the pending text, ties to the earliest
        start. Only pending text is searched: emitted text is at least hold_back characters before
        any new character, so a match can never begin in it."""
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            start = self._pending.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])
