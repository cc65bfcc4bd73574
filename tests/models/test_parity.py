"""Our model definitions against transformers (torch CPU, float32, eager attention): the authority.

Every architecture, both config styles (classic rope_theta/rope_scaling and transformers-5
rope_parameters/layer_types), both ways of building the checkpoint (by hand, and transformers'
own save_pretrained). Logits must agree within LOGIT_ATOL; greedy tokens must be identical.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from fixtures.checkpoints import ARCHS, STYLES, VIAS
from fixtures.reference import PROMPTS, hf_greedy, hf_logits

from mlxserve.models.loader import load_model

# float32 on both sides; measured max |diff| is ~1e-6 (llama) to ~2e-5 (gemma2 soft-capping).
LOGIT_ATOL = 1e-4
NUM_GREEDY = 12

CASES = [pytest.param(a, s, v, id=f"{a}-{s}-{v}") for a, s, v in itertools.product(ARCHS, STYLES, VIAS)]


def _model(ckpt):
    return load_model(ckpt).model


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache)
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache)
    return out


@pytest.mark.parametrize("arch,style,via", CASES)
def test_logits_match_transformers(tiny_ckpt, arch, style, via):
    ckpt = tiny_ckpt(arch, style=style, via=via)
    model = _model(ckpt)
    for prompt in PROMPTS:
        ours = np.array(model(mx.array([prompt]))[0])
        ref = hf_logits(ckpt, prompt)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("arch,style,via", CASES)
def test_greedy_tokens_match_transformers_generate(tiny_ckpt, arch, style, via):
    ckpt = tiny_ckpt(arch, style=style, via=via)
    model = _model(ckpt)
    for prompt in PROMPTS:
        assert _greedy(model, prompt, NUM_GREEDY) == hf_greedy(ckpt, prompt, NUM_GREEDY)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_full_recompute(tiny_ckpt, arch):
    """Chunked prefill + one-token steps through the cache == one pass over the whole sequence.

    The sequence (37 tokens) is longer than every fixture's sliding window, so rotating caches wrap.
    """
    model = _model(tiny_ckpt(arch))
    ids = PROMPTS[-1]
    full = np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    chunks = [ids[:5], ids[5:19]] + [[t] for t in ids[19:30]] + [ids[30:]]
    pieces = [np.array(model(mx.array([c]), cache)[0]) for c in chunks]
    np.testing.assert_allclose(np.concatenate(pieces), full, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_max_kv_size_caps_the_cache_and_matches_a_masked_reference(tiny_ckpt, arch):
    """With max_kv_size=M, each query sees the first 4 positions and the M-4 most recent ones.

    The reference runs the whole sequence in one pass with that mask built explicitly.
    """
    model = _model(tiny_ckpt(arch))
    ids = PROMPTS[-1]
    M = 10
    cache = model.make_cache(max_kv_size=M)
    stepwise = [np.array(model(mx.array([ids[:6]]), cache)[0])]
    stepwise += [np.array(model(mx.array([[t]]), cache)[0]) for t in ids[6:]]
    held = [c.keys.shape[2] for c in cache]
    assert max(held) <= M  # memory is capped
    one_pass_cache = model.make_cache(max_kv_size=M)
    one_pass = np.array(model(mx.array([ids]), one_pass_cache)[0])
    np.testing.assert_allclose(np.concatenate(stepwise), one_pass, atol=LOGIT_ATOL, rtol=0)
    # Within the first M positions nothing has rotated out: equal to the uncapped model.
    uncapped = np.array(model(mx.array([ids]))[0])
    np.testing.assert_allclose(one_pass[:M], uncapped[:M], atol=LOGIT_ATOL, rtol=0)
    assert np.abs(one_pass[M + 2 :] - uncapped[M + 2 :]).max() > 1e-3  # and the cap really bites


def test_unknown_model_type_lists_supported(tmp_path):
    from mlxserve.errors import UnsupportedModelError
    from mlxserve.models.loader import build_model

    with pytest.raises(UnsupportedModelError) as e:
        build_model({"model_type": "gpt_neox"})
    assert str(e.value) == (
        "model_type 'gpt_neox' is not supported by mlxserve; supported: "
        "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"
    )
