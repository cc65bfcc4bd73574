"""Sampler and logits processors: exact masks and penalties, seeding, distribution sanity."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import mlx.core as mx
import pytest

from mlxserve.sampling.params import SamplingParams
from mlxserve.sampling.processors import (
    LogitBias,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    apply_logits_processors,
    make_logits_processors,
)
from mlxserve.sampling.sampler import Sampler, apply_min_p, apply_top_k, apply_top_p

NEG_INF = -math.inf
# Probabilities 0.1, 0.5, 0.25, 0.15 (log space): sorted order is ids 1, 2, 3, 0.
PROBS = [0.1, 0.5, 0.25, 0.15]


def _log_probs() -> mx.array:
    return mx.log(mx.array([PROBS]))


def _finite_mask(x: mx.array) -> list[bool]:
    return [v != NEG_INF for v in x[0].tolist()]


# ---- truncation masks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "kept"),
    [(1, [False, True, False, False]), (2, [False, True, True, False]), (3, [False, True, True, True]),
     (0, [True] * 4), (4, [True] * 4), (10, [True] * 4)],
)
def test_top_k_mask(k: int, kept: list[bool]) -> None:
    out = apply_top_k(_log_probs(), k)
    assert _finite_mask(out) == kept
    expected = [v if keep else NEG_INF for v, keep in zip(_log_probs()[0].tolist(), kept)]
    assert out[0].tolist() == expected


def test_top_k_keeps_exactly_k_with_ties() -> None:
    out = apply_top_k(mx.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), 2)
    assert sum(_finite_mask(out)) == 2 and out[0, 0].item() == NEG_INF and out[0, 4].item() == NEG_INF


@pytest.mark.parametrize(
    ("p", "kept"),
    [
        (0.05, [False, True, False, False]),  # the top token always stays
        (0.5, [False, True, False, False]),  # 0.5 alone reaches 0.5 (mass before id 2 is 0.5, not < 0.5)
        (0.7, [False, True, True, False]),
        (0.8, [False, True, True, True]),
        (0.95, [True, True, True, True]),
        (1.0, [True, True, True, True]),
    ],
)
def test_top_p_mask(p: float, kept: list[bool]) -> None:
    out = apply_top_p(_log_probs(), p)
    assert _finite_mask(out) == kept
    expected = [v if keep else NEG_INF for v, keep in zip(_log_probs()[0].tolist(), kept)]
    assert out[0].tolist() == expected  # kept values unchanged and back in vocabulary order


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [(0.0, [True] * 4), (0.19, [True] * 4), (0.21, [False, True, True, True]), (0.31, [False, True, True, False]),
     (0.51, [False, True, False, False]), (1.0, [False, True, False, False])],
)
def test_min_p_mask(min_p: float, kept: list[bool]) -> None:
    assert _finite_mask(apply_min_p(_log_probs(), min_p)) == kept


def test_masks_work_per_row() -> None:
    logits = mx.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert apply_top_k(logits, 1).tolist() == [[NEG_INF, NEG_INF, 2.0], [2.0, NEG_INF, NEG_INF]]
    assert apply_top_p(logits, 0.5).tolist() == [[NEG_INF, NEG_INF, 2.0], [2.0, NEG_INF, NEG_INF]]
    assert apply_min_p(logits, 0.3).tolist() == [[NEG_INF, 1.0, 2.0], [2.0, 1.0, NEG_INF]]  # e^-1 > 0.3 > e^-2


# ---- sampler ------------------------------------------------------------------------------------


def test_greedy_and_logprobs_convention() -> None:
    logits = mx.array([[0.5, 2.0, -1.0, 2.5], [3.0, 0.0, 0.0, 0.0]])
    result = Sampler(SamplingParams())(logits)
    assert result.token_ids.dtype == mx.int32 and result.token_ids.tolist() == [3, 0]
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert mx.allclose(result.logprobs, expected).item()
    # Logprobs come from the processed logits, before temperature/truncation: the same at any setting.
    hot = Sampler(SamplingParams(temperature=1.7, top_k=1, seed=0))(logits)
    assert mx.allclose(hot.logprobs, expected).item()
    assert hot.token_ids.tolist() == [3, 0]  # top_k=1 forces the argmax


def test_seeded_sampler_is_reproducible_whatever_the_global_rng() -> None:
    logits = mx.zeros((1, 50))  # uniform: maximum randomness

    def draw(seed: int, disturb: int) -> list[int]:
        mx.random.seed(disturb)
        mx.random.uniform(shape=(disturb + 1,))  # consume some global RNG state
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits).token_ids.item() for _ in range(50)]

    first = draw(seed=7, disturb=1)
    assert first == draw(seed=7, disturb=2)
    assert first != draw(seed=8, disturb=1)
    assert len(set(first)) > 10  # the key advances: not 50 copies of one token


def test_unseeded_sampler_uses_the_global_rng() -> None:
    logits = mx.zeros((1, 1000))
    sampler = Sampler(SamplingParams(temperature=1.0))
    mx.random.seed(3)
    a = [sampler(logits).token_ids.item() for _ in range(5)]
    mx.random.seed(3)
    b = [sampler(logits).token_ids.item() for _ in range(5)]
    assert a == b


def test_distribution_matches_probabilities() -> None:
    # p(token 1) = 3 / (1 + 3) = 0.75. Binomial sd over 4000 draws is 0.0068; allow 0.03 (> 4 sd).
    logits = mx.broadcast_to(mx.array([[0.0, math.log(3.0)]]), (4000, 2))
    tokens = Sampler(SamplingParams(temperature=1.0, seed=1234))(logits).token_ids
    share = mx.mean(tokens.astype(mx.float32)).item()
    assert abs(share - 0.75) <= 0.03


def test_temperature_sharpens() -> None:
    logits = mx.broadcast_to(mx.array([[0.0, math.log(3.0)]]), (4000, 2))
    share = mx.mean(Sampler(SamplingParams(temperature=0.5, seed=5))(logits).token_ids.astype(mx.float32)).item()
    assert abs(share - 0.9) <= 0.03  # 9 / (1 + 9) at temperature 0.5


def test_sampling_stays_inside_the_truncated_set() -> None:
    logits = mx.broadcast_to(mx.log(mx.array([[0.05, 0.4, 0.3, 0.15, 0.1]])), (2000, 5))
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.3, seed=11)
    tokens = set(Sampler(params)(logits).token_ids.tolist())
    assert tokens == {1, 2, 3}  # top_k drops 0; top_p keeps 1,2,3 (0.7 < 0.8); min_p 0.12 drops 4


def test_no_host_reads_in_sampling_code() -> None:
    root = Path(__file__).resolve().parents[2] / "mlxserve" / "sampling"
    for name in ("sampler.py", "processors.py"):
        tree = ast.parse((root / name).read_text())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & {"item", "tolist", "eval", "async_eval", "array_equal"}, name
        imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert "numpy" not in imports, name


# ---- processors ---------------------------------------------------------------------------------

TOKENS = mx.array([1, 2, 2, 3], dtype=mx.int32)  # prompt = [1]; generated = [2, 2, 3]
LOGITS = mx.array([[1.0, 2.0, -2.0, 4.0, 0.5]])


def test_repetition_penalty_exact() -> None:
    out = RepetitionPenalty(2.0, context_size=3)(TOKENS, 1, LOGITS)
    assert out.tolist() == [[1.0, 2.0, -4.0, 2.0, 0.5]]  # last 3 tokens: 2 (negative: *2), 3 (positive: /2)
    wide = RepetitionPenalty(2.0, context_size=20)(TOKENS, 1, LOGITS)
    assert wide.tolist() == [[1.0, 1.0, -4.0, 2.0, 0.5]]  # prompt tokens count too
    assert LOGITS.tolist() == [[1.0, 2.0, -2.0, 4.0, 0.5]]  # input untouched


def test_presence_and_frequency_penalties_exact() -> None:
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)(TOKENS, 1, LOGITS)
    # id 2: count 2 -> -2 - (0.5 + 0.5); id 3: count 1 -> 4 - (0.5 + 0.25); id 1 is prompt only.
    assert out.tolist() == [[1.0, 2.0, -3.0, 3.25, 0.5]]
    negative = PresenceFrequencyPenalty(presence=-1.0, frequency=0.0)(TOKENS, 1, LOGITS)
    assert negative.tolist() == [[1.0, 2.0, -1.0, 5.0, 0.5]]


def test_logit_bias_exact() -> None:
    out = LogitBias((0, 4), (10.0, -100.0))(TOKENS, 1, LOGITS)
    assert out.tolist() == [[11.0, 2.0, -2.0, 4.0, -99.5]]
    assert LOGITS.tolist() == [[1.0, 2.0, -2.0, 4.0, 0.5]]


def test_processors_with_no_history() -> None:
    empty = mx.array([], dtype=mx.int32)
    for processor in (RepetitionPenalty(2.0), PresenceFrequencyPenalty(1.0, 1.0)):
        assert processor(empty, 0, LOGITS).tolist() == LOGITS.tolist()
    assert PresenceFrequencyPenalty(1.0, 1.0)(TOKENS, 4, LOGITS).tolist() == LOGITS.tolist()  # all prompt


def test_make_logits_processors_order_and_composition() -> None:
    assert make_logits_processors(SamplingParams()) == []
    params = SamplingParams(
        repetition_penalty=2.0, repetition_context_size=3, presence_penalty=0.5, frequency_penalty=0.25,
        logit_bias={0: 10.0, 4: -100.0},
    )
    processors = make_logits_processors(params)
    assert [type(p) for p in processors] == [RepetitionPenalty, PresenceFrequencyPenalty, LogitBias]
    out = apply_logits_processors(processors, TOKENS, 1, LOGITS)
    # repetition: [1, 2, -4, 2, 0.5]; penalties: id 2 -> -5, id 3 -> 1.25; bias: id 0 +10, id 4 -100.
    assert out.tolist() == [[11.0, 2.0, -5.0, 1.25, -99.5]]


def test_processors_broadcast_over_rows() -> None:
    logits = mx.concatenate([LOGITS, LOGITS * 2], axis=0)
    out = RepetitionPenalty(2.0, context_size=3)(TOKENS, 1, logits)
    assert out.tolist() == [[1.0, 2.0, -4.0, 2.0, 0.5], [2.0, 4.0, -8.0, 4.0, 1.0]]
