"""Build a small byte-level BPE tokenizer folder from local text (no network, no downloads).

The training text mixes ASCII prose, code, numbers, accented Latin, combining marks, CJK and emoji, so
that a small vocabulary leaves many multi-byte characters split across several byte tokens: the case
that incremental detokenization must get right.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0..4, in this order

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Hello, world! Hello again, world. How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # prints 3\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tcontinue\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2024-06-01 1e-5 0xFF",
    "Café, naïve, résumé, façade, Ångström, Straße, smörgåsbord, jalapeño.",
    "Combining marks: e\u0301 a\u0308 o\u0302 n\u0303 (decomposed forms).",
    "中文测试：你好，世界！今天天气很好。我们一起学习机器学习。",
    "日本語のテキストです。こんにちは世界。カタカナとひらがな。",
    "한국어 문장입니다. 안녕하세요 세계.",
    "Emoji: 😀 😃 🎉 🚀 👍🏽 👩‍💻 ❤️ 🇫🇷 — and more 🙂🙃.",
    "Spaces:  two  spaces,   three   spaces,\n\nnew lines\tand tabs.",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी.",
    "<html><body><p class=\"x\">Text &amp; more</p></body></html>",
]


def _train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 3, trainer)
    return tok


def write_tokenizer_fixture(
    folder: Path,
    *,
    vocab_size: int = 420,
    add_bos: bool = True,
    chat_template: str | None = CHATML_TEMPLATE,
    config_overrides: Mapping[str, Any] | None = None,
    write_model_configs: bool = True,
) -> Path:
    """Train the tokenizer and write tokenizer.json, tokenizer_config.json (+ config.json and
    generation_config.json) into ``folder``. ``add_bos`` makes the post-processor prepend ``<s>``,
    as Llama 3's tokenizer.json does. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train(vocab_size)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": {  # the older AddedToken-dict form
            "__type": "AddedToken", "content": EOS, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
        },
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                "single_word": False,
            }
            for t in SPECIAL_TOKENS
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(config_overrides or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), "utf-8")
    if write_model_configs:
        eos_id, im_end_id = tok.token_to_id(EOS), tok.token_to_id(IM_END)
        model_config = {"model_type": "llama", "bos_token_id": tok.token_to_id(BOS), "eos_token_id": eos_id}
        (folder / "config.json").write_text(json.dumps(model_config), "utf-8")
        generation_config = {"eos_token_id": [eos_id, im_end_id], "bos_token_id": tok.token_to_id(BOS)}
        (folder / "generation_config.json").write_text(json.dumps(generation_config), "utf-8")
    return folder


def write_sentencepiece_fixture(folder: Path) -> Path:
    """A Llama-style folder with only ``tokenizer.model`` (sentencepiece BPE, byte fallback) and a
    tokenizer_config.json: no tokenizer.json, so loading goes through transformers' conversion.
    Needs the ``sentencepiece`` package (callers skip without it)."""
    import io

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 3), model_writer=model, vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return folder
