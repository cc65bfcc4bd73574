"""Round trips with mlx-lm 0.32: our 4-bit output runs in mlx-lm, and mlx-lm's conversion runs in
mlxserve, with the same greedy tokens. transformers is the authority where mlx-lm reads a config wrongly.

Where mlx-lm 0.32 disagrees with transformers on the fixture checkpoints (measured: max |logit diff|
against transformers float32 eager, ours <= 3.1e-5 on every arch and style):

    classic configs (what hub checkpoints made before transformers 5 carry)
      mistral      `sliding_window` ignored: mlx-lm maps mistral to its llama model, which slides only
                   layers named "sliding_attention" in `layer_types`; classic Mistral configs have none
      gemma2       `sliding_window` ignored: mlx-lm's gemma2 has no sliding-window attention at all
      others       agree (llama, llama3, qwen2, qwen3, gemma3_text, phi3)
    transformers-5 configs (`rope_parameters`, `layer_types`)
      every arch but qwen3 (whose mlx-lm model reads `rope_parameters`): mlx-lm reads only top-level
      `rope_theta` / `rope_scaling`, so it runs its default theta and drops llama3 scaling;
      gemma3_text crashes (no `sliding_window_pattern`: its default 6 is more than the 4 layers).

For those, the equality with mlx-lm is skipped with the reason, and our output is held to
transformers instead (logits and greedy tokens).
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import mlxserve
from fixtures.checkpoints import ARCHS
from fixtures.reference import PROMPTS, hf_greedy, hf_logits
from mlxserve.convert import ConvertConfig, convert
from mlxserve.generation.steps import generate_tokens
from mlxserve.sampling.params import SamplingParams

NUM_NEW_TOKENS = 8
HF_ATOL = 1e-4  # ours vs transformers, float32: measured <= 3.1e-5 on every fixture

_SLIDING_MISREAD = {
    "mistral": "mlx-lm 0.32 ignores `sliding_window` (16) for mistral: it maps mistral to its llama model, "
               "which slides only layers listed as 'sliding_attention' in `layer_types`, absent from Mistral configs",
    "gemma2": "mlx-lm 0.32's gemma2 ignores `sliding_window` (8): it has no sliding-window attention",
}
SLIDING_WINDOW = {"mistral": 16, "gemma2": 8}
_V5_MISREAD = (
    "mlx-lm 0.32's {arch} model does not read `rope_parameters` (transformers-5 config): "
    "it falls back to its default `rope_theta`"
)
_V5_CRASH = ("mlx-lm 0.32's gemma3_text does not read `layer_types` and needs `sliding_window_pattern`, absent from "
             "transformers-5 configs: its default of 6 exceeds the 4 layers and indexing the cache fails")


def mlx_lm_disagreement(arch: str, style: str) -> str | None:
    """Why mlx-lm 0.32 computes something else than transformers for this fixture, or None."""
    if style == "classic":
        return _SLIDING_MISREAD.get(arch)
    if arch == "qwen3":
        return None
    if arch == "gemma3_text":
        return _V5_CRASH
    sliding = _SLIDING_MISREAD.get(arch)
    return _V5_MISREAD.format(arch=arch) + (f"; also, {sliding}" if sliding else "")


def ours_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    steps = generate_tokens(model, prompt, SamplingParams(temperature=0.0), cache=model.make_cache())
    return [s.token for s in itertools.islice(steps, n)]


def mlx_lm_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """mlx-lm's own token loop; with no sampler it takes the argmax."""
    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def convert_ours(src: Path, out: Path, **kw) -> Path:
    convert(ConvertConfig(source=str(src), output=out, verify=False, **kw))
    return out


def convert_with_mlx_lm(src: Path, out: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints [INFO] lines
        mlx_lm.convert(str(src), str(out), quantize=True)
    return out


def quantized_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        p: (m.bits, m.group_size)
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def skip_if_mlx_lm_disagrees(arch: str, style: str) -> None:
    reason = mlx_lm_disagreement(arch, style)
    if reason is not None:
        pytest.skip(reason)


# ------------------------------------------------------------------------------ classic configs


@pytest.mark.parametrize("arch", ARCHS)
def test_our_4bit_output_runs_in_mlx_lm(tiny_ckpt, tmp_path, arch):
    skip_if_mlx_lm_disagrees(arch, "classic")
    out = convert_ours(tiny_ckpt(arch), tmp_path / "out")
    ours, _ = mlxserve.load(out)
    theirs, _ = mlx_lm.load(str(out))
    assert quantized_layers(theirs) == quantized_layers(ours) != {}
    for prompt in PROMPTS:
        assert ours_greedy(ours, prompt, NUM_NEW_TOKENS) == mlx_lm_greedy(theirs, prompt, NUM_NEW_TOKENS)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_conversion_runs_in_mlxserve(tiny_ckpt, tmp_path, arch):
    skip_if_mlx_lm_disagrees(arch, "classic")
    out = convert_with_mlx_lm(tiny_ckpt(arch), tmp_path / "mlx-lm")
    ours, _ = mlxserve.load(out)
    theirs, _ = mlx_lm.load(str(out))
    layers = quantized_layers(ours)
    assert layers == quantized_layers(theirs) and set(layers.values()) == {(4, 64)}
    for prompt in PROMPTS:
        assert ours_greedy(ours, prompt, NUM_NEW_TOKENS) == mlx_lm_greedy(theirs, prompt, NUM_NEW_TOKENS)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_public_generate_apis_agree(tiny_ckpt, tmp_path, arch):
    """mlxserve.stream_generate (temperature 0) against mlx_lm.stream_generate (default greedy sampler),
    both stopping at the tokenizer's end-of-sequence ids, on our conversion.

    Only the tokens are compared with mlx-lm: its text drops the first token's leading space and
    prints special tokens (e.g. "<s>") inline. Our text is held to transformers' decode instead.
    """
    from transformers import AutoTokenizer

    out = convert_ours(tiny_ckpt(arch), tmp_path / "out")
    ours, our_tok = mlxserve.load(out)
    theirs, their_tok = mlx_lm.load(str(out))
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for prompt in PROMPTS:
        our_ids = [r.token for r in mlxserve.stream_generate(ours, our_tok, prompt, temperature=0.0, max_tokens=12)]
        their_ids = [r.token for r in mlx_lm.stream_generate(theirs, their_tok, prompt, max_tokens=12)]
        assert our_ids == their_ids
        text = mlxserve.generate(ours, our_tok, prompt, temperature=0.0, max_tokens=12)
        assert text == hf_tok.decode(our_ids, skip_special_tokens=True)


# ------------------------------------------------------------------- where mlx-lm disagrees


@pytest.mark.parametrize("arch", sorted(SLIDING_WINDOW))
def test_mlx_lm_disagreement_is_its_sliding_window(tiny_ckpt, arch):
    """The skip reason is exact: mlx-lm equals transformers until the window fills, then departs."""
    src, window, prompt = tiny_ckpt(arch), SLIDING_WINDOW[arch], PROMPTS[2]
    reference = hf_logits(src, prompt)
    theirs, _ = mlx_lm.load(str(src))
    ours, _ = mlxserve.load(src)
    their_logits = np.array(theirs(mx.array([prompt]))[0])
    our_logits = np.array(ours(mx.array([prompt]))[0])
    np.testing.assert_allclose(our_logits, reference, rtol=0, atol=HF_ATOL)
    np.testing.assert_allclose(their_logits[:window], reference[:window], rtol=0, atol=HF_ATOL)
    assert np.abs(their_logits[window] - reference[window]).max() > 0.1  # departs at the window's edge
    assert np.abs(their_logits[window:] - reference[window:]).max() > 5.0


@pytest.mark.parametrize("arch", sorted(SLIDING_WINDOW))
def test_round_trip_within_the_window(tiny_ckpt, tmp_path, arch):
    """While every position still sees its whole context, the window does not matter: both ways agree."""
    prompt = PROMPTS[0]
    n = SLIDING_WINDOW[arch] - len(prompt) + 1  # the last token is sampled at position window - 1
    src = tiny_ckpt(arch)
    for out in (convert_ours(src, tmp_path / "ours"), convert_with_mlx_lm(src, tmp_path / "theirs")):
        ours, _ = mlxserve.load(out)
        theirs, _ = mlx_lm.load(str(out))
        assert ours_greedy(ours, prompt, n) == mlx_lm_greedy(theirs, prompt, n)


DISAGREEING = [(arch, "classic") for arch in sorted(SLIDING_WINDOW)] + [
    (arch, "v5") for arch in ARCHS if mlx_lm_disagreement(arch, "v5") is not None
]


@pytest.mark.parametrize(("arch", "style"), DISAGREEING)
def test_our_output_equals_transformers(tiny_ckpt, tmp_path, arch, style):
    """Where mlx-lm cannot be the yardstick, our full-precision conversion must match transformers."""
    src = tiny_ckpt(arch, style=style)
    ours, _ = mlxserve.load(convert_ours(src, tmp_path / "out", quantize=False))
    for prompt in PROMPTS:
        logits = np.array(ours(mx.array([prompt]))[0])
        np.testing.assert_allclose(logits, hf_logits(src, prompt), rtol=0, atol=HF_ATOL)
    prompt = PROMPTS[1]
    assert ours_greedy(ours, prompt, NUM_NEW_TOKENS) == hf_greedy(src, prompt, NUM_NEW_TOKENS)


# ---------------------------------------------------------------------- transformers-5 configs


@pytest.mark.parametrize("arch", ARCHS)
def test_v5_config_round_trip(tiny_ckpt, tmp_path, arch):
    skip_if_mlx_lm_disagrees(arch, "v5")
    out = convert_ours(tiny_ckpt(arch, style="v5"), tmp_path / "out")
    ours, _ = mlxserve.load(out)
    theirs, _ = mlx_lm.load(str(out))
    for prompt in PROMPTS:
        assert ours_greedy(ours, prompt, NUM_NEW_TOKENS) == mlx_lm_greedy(theirs, prompt, NUM_NEW_TOKENS)
