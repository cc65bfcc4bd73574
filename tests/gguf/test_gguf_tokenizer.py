"""tokenizer.json rebuilt from GGUF metadata encodes like the tokenizer it came from.

Byte-level vocabularies are checked against the fixture's own tokenizer.json; sentencepiece-style
ones against transformers' GGUF tokenizer loader (the independent reference for files that never
had a tokenizer.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _gguf_builder import build_gguf, build_spm_tokenizer_gguf
from fixtures.tokenizer import CORPUS_PATH
from mlxserve.convert.gguf import convert_gguf
from mlxserve.convert.gguf.reader import read_gguf
from mlxserve.convert.gguf.tokenizer import build_tokenizer

from mlxserve.tokenizer.wrapper import Tokenizer

TEXTS = [
    "Hello world",
    " leading space, then  two and   three spaces",
    "def f(x):\n    return x ** 2  # square\n\n\tdone",
    "numbers 1234567 and 3.14159, -42",
    "unicode: café, naïve, 日本語のテキスト, emoji 🙂🚀",
    "special <|im_start|>user\nhi<|im_end|> and </s> inside",
    "trailing spaces   ",
    "",
]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    """(fixture checkpoint, converted folder) for the tiny llama with its byte-level tokenizer."""
    ckpt = tiny_ckpt("llama")
    tmp = tmp_path_factory.mktemp("gguf-tok")
    built = build_gguf(ckpt, tmp / "m.gguf", "llama")
    convert_gguf(built.path, tmp / "out", quantize=False, dtype="float32")
    return ckpt, tmp / "out"


def test_byte_level_tokenizer_matches_the_source(converted):
    ckpt, out = converted
    ours, source = Tokenizer.from_pretrained(out), Tokenizer.from_pretrained(ckpt)
    for text in TEXTS:
        ids = source.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == source.decode(ids) == text
    assert ours.encode_chat(MESSAGES) == source.encode_chat(MESSAGES)
    assert ours.eos_token_ids == {2}  # a GGUF has one eos id (the source also stops on id 0)
    assert ours.bos_token_id == source.bos_token_id == 3
    assert ours.all_special_ids == source.all_special_ids
    assert ours.vocab_size == source.vocab_size == 512


def test_tokenizer_files_record_special_tokens_and_template(converted):
    ckpt, out = converted
    config = json.loads((out / "tokenizer_config.json").read_text())
    source = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "add_bos_token", "chat_template")} == {
        k: source[k] for k in ("bos_token", "eos_token", "pad_token", "add_bos_token", "chat_template")
    }
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 3, "eos_token_id": 2, "pad_token_id": 0,
    }


def test_end_of_turn_id_joins_the_stop_ids(tiny_ckpt, tmp_path):
    built = build_gguf(tiny_ckpt("llama"), tmp_path / "m.gguf", "llama", extra_metadata={"tokenizer.ggml.eot_token_id": 1})
    convert_gguf(built.path, tmp_path / "out", quantize=False, dtype="float32")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 1]
    assert Tokenizer.from_pretrained(tmp_path / "out").eos_token_ids == {1, 2}


def hf_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def ours(path: Path):
    import tokenizers

    return tokenizers.Tokenizer.from_str(build_tokenizer(read_gguf(path)).tokenizer_json)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_regexes_match_transformers(tiny_ckpt, tmp_path, pre):
    built = build_gguf(tiny_ckpt("qwen2"), tmp_path / "m.gguf", "qwen2", tokenizer_pre=pre)
    reference, mine = hf_gguf_tokenizer(built.path), ours(built.path)
    for text in TEXTS:
        assert mine.encode(text).ids == reference(text)["input_ids"], text


def test_smollm_pre_tokenizer_isolates_digits(tiny_ckpt, tmp_path):
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM's own tokenizer.json) split every digit off
    first, so a space run before a number stays one piece; transformers' GGUF loader does not."""
    built = build_gguf(tiny_ckpt("qwen2"), tmp_path / "m.gguf", "qwen2", tokenizer_pre="smollm")
    mine = ours(built.path)
    assert mine.pre_tokenizer.pre_tokenize_str("ab  12 c") == [
        ("ab", (0, 2)), ("ĠĠ", (2, 4)), ("1", (4, 5)), ("2", (5, 6)), ("Ġc", (6, 8)),
    ]


@pytest.mark.parametrize(("arch", "add_space_prefix"), [("llama", None), ("llama", True), ("phi3", True), ("gemma2", False)])
def test_sentencepiece_vocab_matches_transformers(tmp_path, arch, add_space_prefix):
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    path = build_spm_tokenizer_gguf(tmp_path / "spm.gguf", arch, corpus, add_space_prefix=add_space_prefix)
    reference, mine = hf_gguf_tokenizer(path), ours(path)
    for text in [*TEXTS, corpus[:400]]:
        expected = reference(text)["input_ids"]
        assert mine.encode(text).ids == expected, text
        assert mine.decode(expected, skip_special_tokens=False) == reference.decode(expected), text
    # A llama-type vocabulary gets BOS unless the file says otherwise (llama.cpp's rule).
    assert mine.encode("hi").ids[0] == reference("hi")["input_ids"][0] == 1


def test_add_space_prefix_false_is_honoured(tmp_path):
    """llama.cpp prepends no "▁" when the file says add_space_prefix = false (transformers' GGUF
    loader ignores the flag for llama vocabularies, so it is no reference here)."""
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    with_prefix = ours(build_spm_tokenizer_gguf(tmp_path / "a.gguf", "llama", corpus, add_space_prefix=True))
    without = ours(build_spm_tokenizer_gguf(tmp_path / "b.gguf", "llama", corpus, add_space_prefix=False))
    assert with_prefix.encode("Hello world").tokens[1].startswith("▁")
    assert not without.encode("Hello world").tokens[1].startswith("▁")
    assert without.encode(" Hello world").ids == with_prefix.encode("Hello world").ids
    assert without.decode(without.encode("Hello world").ids) == "Hello world"
