"""Tokenizer wrapper: parity with transformers, special ids, chat templates, load errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tokenizer_fixture import (
    BOS, CHATML_TEMPLATE, EOS, IM_END, IM_START, PAD, write_sentencepiece_fixture, write_tokenizer_fixture,
)

from mlxserve.errors import InvalidRequestError, ModelLoadError
from mlxserve.tokenizer.wrapper import Tokenizer

TEXTS = [
    "Hello, world!",
    "中文测试：你好，世界！ 日本語 한국어",
    "Emoji 😀🎉 👩‍💻 🇫🇷 and e\u0301 combining",
    "def add(a, b):\n    return a + b  # 42\n\tx = 3.14159 * 1e-5",
    "  leading spaces,   repeated   spaces\n\n",
    "numbers 0 12 345 6789 2024-06-01 0xFF",
    f"special {IM_START}inside{IM_END} text {EOS}",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi 😀 in 中文"},
    {"role": "assistant", "content": "你好"},
    {"role": "user", "content": "Again, with code: `x = 42`"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_fixture(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


def _hf(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _variant_folders(root: Path) -> dict[str, Path]:
    """Folders whose encode must match transformers, covering its add_bos_token behaviour."""
    from fixtures.tokenizer import build_tokenizer  # the project's checkpoint tokenizer

    build_tokenizer(root / "project")
    return {
        "bos_in_post_processor": write_tokenizer_fixture(root / "a"),
        # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists.
        "config_add_bos_ignored": write_tokenizer_fixture(
            root / "b", add_bos=False, config_overrides={"add_bos_token": True, "add_eos_token": True}
        ),
        "config_no_bos_ignored": write_tokenizer_fixture(root / "c", config_overrides={"add_bos_token": False}),
        "project_fixture": root / "project",
    }


@pytest.mark.parametrize(
    "variant", ["bos_in_post_processor", "config_add_bos_ignored", "config_no_bos_ignored", "project_fixture"]
)
def test_encode_matches_transformers(tmp_path: Path, variant: str) -> None:
    folder = _variant_folders(tmp_path)[variant]
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_bos_comes_from_the_post_processor(tokenizer: Tokenizer, tmp_path: Path) -> None:
    assert tokenizer.encode("Hello")[0] == 0 == tokenizer.bos_token_id
    assert tokenizer.encode("Hello", add_special_tokens=False)[0] != 0
    no_bos = Tokenizer.from_pretrained(write_tokenizer_fixture(tmp_path, add_bos=False))
    assert no_bos.encode("Hello") == tokenizer.encode("Hello", add_special_tokens=False)


def test_special_ids_and_sizes(tokenizer: Tokenizer) -> None:
    ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, PAD, IM_START, IM_END)}
    assert ids == {BOS: 0, EOS: 1, PAD: 2, IM_START: 3, IM_END: 4}
    # tokenizer eos (</s>) | config.json eos (</s>) | generation_config.json eos ([</s>, <|im_end|>])
    assert tokenizer.eos_token_ids == frozenset({1, 4})
    assert tokenizer.bos_token_id == 0
    assert tokenizer.vocab_size == 420
    assert tokenizer.all_special_ids == frozenset({0, 1, 2, 3, 4})
    assert tokenizer.special_tokens == {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    assert tokenizer.convert_ids_to_tokens([0, 4]) == [BOS, IM_END]


def test_eos_from_configs_only(tmp_path: Path) -> None:
    folder = write_tokenizer_fixture(tmp_path, config_overrides={"eos_token": None, "bos_token": None})
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 4, "bos_token_id": 3}))
    (folder / "generation_config.json").unlink()
    tok = Tokenizer.from_pretrained(folder)
    assert tok.eos_token_ids == frozenset({4})
    assert tok.bos_token_id == 3


def test_chat_matches_transformers(folder: Path, tokenizer: Tokenizer) -> None:
    hf = _hf(folder)
    for add_generation_prompt in (True, False):
        text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        expected_text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text == expected_text
        expected = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
        expected_ids = expected["input_ids"] if hasattr(expected, "keys") else expected
        ids = tokenizer.encode_chat(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert ids == expected_ids
        assert ids.count(0) == 1 and ids[0] == 0  # BOS written once, by the template


def test_chat_template_sources(tmp_path: Path) -> None:
    listed = [
        {"name": "default", "template": "D{{ messages|length }}"},
        {"name": "tool_use", "template": "T{{ tools|length }}"},
    ]
    folder = write_tokenizer_fixture(tmp_path / "list", config_overrides={"chat_template": listed})
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template == "D{{ messages|length }}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    assert tok.apply_chat_template([], tools=[{"type": "function"}]) == "T1"

    folder = write_tokenizer_fixture(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text("FILE{{ bos_token }}", encoding="utf-8")
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template == "FILE{{ bos_token }}"
    assert tok.apply_chat_template([]) == "FILE<s>"
    assert tok.apply_chat_template([], bos_token="<B>") == "FILE<B>"  # caller kwargs override special tokens
    assert Tokenizer.from_pretrained(folder).chat_template != CHATML_TEMPLATE


def test_no_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(write_tokenizer_fixture(tmp_path, chat_template=None))
    assert not tok.has_chat_template and tok.chat_template is None
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template(MESSAGES)
    assert info.value.param == "messages"


def test_sentencepiece_fallback_matches_transformers(tmp_path: Path) -> None:
    pytest.importorskip("sentencepiece")
    write_sentencepiece_fixture(tmp_path)
    ours, hf = Tokenizer.from_pretrained(tmp_path), _hf(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
    assert ours.encode("Hello")[0] == 1 == ours.bos_token_id
    assert ours.eos_token_ids == frozenset({2})


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "no tokenizer files"),
        ({"tokenizer.json": "{not json"}, "cannot load tokenizer.json"),
        ({"tokenizer.json": "", "tokenizer_config.json": "{bad"}, "cannot read tokenizer_config.json"),
        ({"tokenizer.json": "", "tokenizer_config.json": "[1, 2]"}, "tokenizer_config.json in"),
    ],
)
def test_load_errors(tmp_path: Path, files: dict[str, str], fragment: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_load_errors_missing_folder_and_bad_config_json(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    bad = write_tokenizer_fixture(tmp_path / "bad")
    (bad / "generation_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        Tokenizer.from_pretrained(bad)
    (bad / "generation_config.json").unlink()
    (bad / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x"}]}))
    with pytest.raises(ModelLoadError, match="chat_template"):
        Tokenizer.from_pretrained(bad)


def test_loading_tokenizer_json_does_not_import_transformers(folder: Path) -> None:
    code = (
        "import sys; from mlxserve.tokenizer.wrapper import Tokenizer; "
        f"t = Tokenizer.from_pretrained({str(folder)!r}); t.encode_chat([{{'role': 'user', 'content': 'hi'}}]); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
