"""The decode lookahead against its slow twin (the synchronous step), and arenas that never move."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.reference import PROMPTS

import mlxserve
from mlxserve.engine.core import EngineConfig, EngineCore
from mlxserve.engine.request import EngineRequest
from mlxserve.sampling.params import SamplingParams

SMALL = dict(kv_memory_gb=0.01, max_prefill_chunk=16, max_num_batched_tokens=64)


def _prompts(n: int = 16) -> list[list[int]]:
    return [PROMPTS[i % 3][: 3 + (i * 7) % 35] for i in range(n)]


@pytest.mark.parametrize("budget_pages", [None, 12])  # 12 pages: requests are preempted and recomputed
def test_lookahead_equals_the_synchronous_step(tiny_ckpt, budget_pages):
    ckpt = tiny_ckpt("llama")
    options = dict(SMALL, enable_prefix_caching=False)
    if budget_pages:
        options["kv_memory_gb"] = budget_pages * 16 * 2 * 2 * 2 * 16 * 4 / 2**30
    results = {}
    for lookahead in (True, False):
        llm = mlxserve.LLM(ckpt, **options)
        llm.engine.runner.lookahead = lookahead
        # Stop tokens finish some rows early: the step after drops its lookahead.
        out = llm.generate(_prompts(8), max_tokens=24, stop_token_ids=[5, 17, 40])
        results[lookahead] = [(r.token_ids, r.logprobs, r.finish_reason) for r in out]
        llm.engine.check_leaks()
    assert results[True] == results[False]


def test_kv_writes_are_in_place(tiny_ckpt):
    """A copied arena would cost a whole KV budget per layer per step: the buffers must not move."""
    model, _ = mlxserve.load(tiny_ckpt("llama"))
    engine = EngineCore(model, EngineConfig(**SMALL))
    for i, prompt in enumerate(_prompts(6)):
        engine.add_request(EngineRequest(f"r{i}", tuple(prompt), SamplingParams(max_tokens=20)))
    addresses = {np.asarray(a).__array_interface__["data"][0] for a in engine.store.arrays}
    while engine.has_unfinished_requests():
        engine.step()
        assert {np.asarray(a).__array_interface__["data"][0] for a in engine.store.arrays} == addresses

