"""IncrementalDetokenizer: streamed text == full decode, no broken UTF-8, stop strings never leak."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from _tokenizer_fixture import IM_END, IM_START, write_sentencepiece_fixture, write_tokenizer_fixture

from mlxserve.tokenizer.detokenizer import IncrementalDetokenizer, TextDelta
from mlxserve.tokenizer.wrapper import Tokenizer

ADVERSARIAL = [
    "中文测试：你好，世界！",
    "😀😃🎉🚀 👍🏽 👩‍💻 ❤️ 🇫🇷🙂🙃",
    "e\u0301a\u0308o\u0302 n\u0303 \u0301 leading combining mark",
    " leading space",
    "   three leading spaces and trailing   ",
    "repeated  spaces   and\n\n\nnewlines\t\ttabs",
    "mixed: Café 中文 😀 def f(x):\n    return x ** 2  # 42",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 rare planes 🀄",
    "Ελληνικά русский עברית العربية हिन्दी",
    "x",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(write_tokenizer_fixture(tmp_path_factory.mktemp("tok")))


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1) -> list[TextDelta]:
    deltas = [detok.update(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.finish()]


def _text(deltas: Sequence[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.mark.parametrize("text", ADVERSARIAL)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_equals_full_decode(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(IncrementalDetokenizer(tokenizer), ids, chunk)
    assert _text(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert all(d.stop_string is None for d in deltas)


def test_sentencepiece_leading_spaces_survive_windowed_decoding(tmp_path: Path) -> None:
    """Metaspace decoders drop the leading space of a decode; the context window keeps word spaces."""
    pytest.importorskip("sentencepiece")
    spm_tokenizer = Tokenizer.from_pretrained(write_sentencepiece_fixture(tmp_path))
    for text in ADVERSARIAL:
        ids = spm_tokenizer.encode(text)
        for chunk in (1, 3):
            deltas = _stream(IncrementalDetokenizer(spm_tokenizer), ids, chunk)
            assert _text(deltas) == spm_tokenizer.decode(ids, skip_special_tokens=True), text
            assert all("\ufffd" not in d.text for d in deltas)


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("龍", add_special_tokens=False)
    assert len(ids) == 3  # not in the training text: one token per UTF-8 byte
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.update([i]).text for i in ids] == ["", "", "龍"]


def test_incomplete_bytes_are_flushed_by_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a中", add_special_tokens=False)[:-1]  # drop the last byte of 中
    detok = IncrementalDetokenizer(tokenizer)
    assert _text([detok.update([i]) for i in ids]) == "a"
    assert detok.finish().text == tokenizer.decode(ids)[1:] == "\ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer: Tokenizer, skip: bool) -> None:
    ids = tokenizer.encode(f"{IM_START}user\nhi 😀{IM_END}\n", add_special_tokens=True)
    deltas = _stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), ids)
    assert _text(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert _text(deltas) == ("user\nhi 😀\n" if skip else f"<s>{IM_START}user\nhi 😀{IM_END}\n")


def test_cost_per_token_is_constant(tokenizer: Tokenizer) -> None:
    """Each step decodes a window of a few tokens, not the whole output."""
    window_sizes: list[int] = []
    decode = tokenizer.decode

    class CountingTokenizer:
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
            window_sizes.append(len(ids))
            return decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(" ".join(ADVERSARIAL) * 20, add_special_tokens=False)
    assert len(ids) > 2000
    deltas = _stream(IncrementalDetokenizer(CountingTokenizer()), ids)  # type: ignore[arg-type]
    assert _text(deltas) == decode(ids)
    assert max(window_sizes) <= 8


# ---- stop strings -------------------------------------------------------------------------------


def _stream_with_stop(
    tokenizer: Tokenizer, text: str, stop: Sequence[str], chunk: int = 1
) -> tuple[list[TextDelta], IncrementalDetokenizer]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    return _stream(detok, ids, chunk), detok


@pytest.mark.parametrize(
    ("text", "stop", "expected_text", "expected_stop"),
    [
        ("Hello world, stop here please", ["stop here"], "Hello world, ", "stop here"),  # spans tokens
        ("Hello world", ["H"], "", "H"),  # very first token
        ("Hello world", ["Hello world"], "", "Hello world"),  # the whole output
        ("hello world foo bar", ["foo", "world"], "hello ", "world"),  # earliest wins
        ("xabcdy", ["abcd", "bc"], "xa", "bc"),  # overlapping: the one that ends first
        ("xabcy", ["abc", "bc"], "x", "abc"),  # same end: the one that starts first
        ("aaab", ["aab"], "a", "aab"),  # self-overlapping prefix
        ("你好，世界！再见", ["世界"], "你好，", "世界"),  # multi-byte stop split across byte tokens
        ("emoji 😀 end", ["😀"], "emoji ", "😀"),
        ("no match here", ["zzz"], "no match here", None),
    ],
)
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_stop_strings(
    tokenizer: Tokenizer, text: str, stop: list[str], expected_text: str, expected_stop: str | None, chunk: int
) -> None:
    deltas, detok = _stream_with_stop(tokenizer, text, stop, chunk)
    assert _text(deltas) == expected_text
    assert detok.stop_string == expected_stop
    assert [d.stop_string for d in deltas if d.stop_string] == ([expected_stop] if expected_stop else [])
    # Nothing past the cut was ever emitted: every running total is a prefix of the final text.
    emitted = ""
    for delta in deltas:
        emitted += delta.text
        assert expected_text.startswith(emitted)


def test_after_stop_everything_is_empty(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["two"])
    deltas = [detok.update([i]) for i in ids]
    assert _text(deltas) == "one "
    assert detok.is_done
    assert detok.update(ids) == TextDelta("") and detok.finish() == TextDelta("")


def test_hold_back_is_max_stop_length_minus_one(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("abcdefghij", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["xyz", "q"])
    emitted = _text([detok.update(ids)])
    assert emitted == "abcdefgh"  # the last 2 characters wait: they could start "xyz"
    assert detok.finish() == TextDelta("ij")


def test_finish_after_finish_and_update_after_finish(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.update(tokenizer.encode("hi", add_special_tokens=False)).text == "hi"
    assert detok.finish() == TextDelta("")
    assert detok.update([5]) == TextDelta("") and detok.is_done


def test_empty_stop_strings_are_ignored(tokenizer: Tokenizer) -> None:
    deltas, detok = _stream_with_stop(tokenizer, "abc", [""])
    assert _text(deltas) == "abc" and detok.stop_string is None


def test_stream_token_ids_are_kept(tokenizer: Tokenizer, tmp_path: Path) -> None:
    ids = tokenizer.encode("abc def", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    detok.update(ids[:2])
    detok.update(ids[2:])
    assert detok.token_ids == tuple(ids)
