"""Scheduler with a fake page-keeping runner: exact budgets per step, preemption order, recompute,
stop conditions, aborts, admission errors, metrics, and a randomized run that must leak nothing."""

from __future__ import annotations

import random

import pytest
from _engine_fakes import PageRunner, expected_output, make_request, make_scheduler, run_to_completion

from mlxserve.engine.config import CacheConfig, SchedulerConfig
from mlxserve.engine.request import EngineRequest, FinishReason, RequestStatus
from mlxserve.errors import ConfigError, ContextLengthError, InvalidRequestError
from mlxserve.sampling.params import SamplingParams


def step(sched, runner):
    out = sched.schedule()
    return out, sched.update_from_output(out, runner.execute(out))


def test_long_prompt_is_chunked_400_400_224_while_a_running_stream_decodes():
    sched = make_scheduler(
        num_pages=200, page_size=16, max_num_batched_tokens=1024, max_prefill_chunk=400, max_model_len=2048
    )
    runner = PageRunner(page_size=16)
    sched.add_request(make_request("r0", range(8), max_tokens=20))
    out, outputs = step(sched, runner)
    assert out.num_scheduled_tokens == {"r0": 8} and [o.request_id for o in outputs] == ["r0"]

    long_prompt = [i % 500 for i in range(1024)]
    sched.add_request(make_request("r1", long_prompt, max_tokens=4))
    budgets, new_block_ids, producers = [], [], []
    for _ in range(4):
        out, outputs = step(sched, runner)
        budgets.append(dict(out.num_scheduled_tokens))
        new_block_ids += [b.block_ids for b in out.scheduled_new_reqs if b.request_id == "r1"]
        new_block_ids += [r.new_block_ids for r in out.scheduled_running if r.request_id == "r1"]
        producers.append([o.request_id for o in outputs])
    assert budgets == [{"r0": 1, "r1": 400}, {"r0": 1, "r1": 400}, {"r0": 1, "r1": 224}, {"r0": 1, "r1": 1}]
    assert producers == [["r0"], ["r0"], ["r0", "r1"], ["r0", "r1"]]
    # r0 holds page 1; r1 takes pages in order, 25 + 25 + 14 (1024 = 64 full pages of 16), and its
    # first decode token (position 1024) opens page 66.
    assert new_block_ids == [tuple(range(2, 27)), tuple(range(27, 52)), tuple(range(52, 66)), (66,)]


def test_second_chunk_carries_the_right_tokens_and_positions():
    sched = make_scheduler(num_pages=20, max_num_batched_tokens=16, max_prefill_chunk=8)
    runner = PageRunner(page_size=4)
    sched.add_request(make_request("a", range(100, 120), max_tokens=2))
    first, _ = step(sched, runner)
    second, _ = step(sched, runner)
    (new,) = first.scheduled_new_reqs
    assert (new.num_computed_tokens, new.block_ids, new.do_sample) == (0, (1, 2), False)
    (running,) = second.scheduled_running
    assert running.new_token_ids == tuple(range(108, 116))
    assert (running.num_computed_tokens, running.new_block_ids, running.do_sample) == (8, (3, 4), False)


def test_token_budget_and_max_num_seqs_limit_admission():
    sched = make_scheduler(num_pages=50, max_num_seqs=2, max_num_batched_tokens=10, max_prefill_chunk=10)
    runner = PageRunner(page_size=4)
    sched.add_request(make_request("a", range(6), max_tokens=2))
    sched.add_request(make_request("b", range(10, 16), max_tokens=4))
    sched.add_request(make_request("c", range(20, 26), max_tokens=4))
    steps = []
    for _ in range(3):
        out, outputs = step(sched, runner)
        steps.append((dict(out.num_scheduled_tokens), sorted(out.finished_ids), [o.request_id for o in outputs]))
    assert steps == [
        ({"a": 6, "b": 4}, [], ["a"]),  # b gets what is left of the budget
        ({"a": 1, "b": 2}, [], ["a", "b"]),  # c waits: two requests run already
        ({"b": 1, "c": 6}, ["a"], ["b", "c"]),  # a finished (max_tokens=2); c joins
    ]


def test_preemption_takes_the_newest_first_and_recompute_gives_the_same_tokens():
    # 6 usable pages of 4 tokens; three 7-token prompts fill them after the first step.
    sched = make_scheduler(num_pages=7, enable_prefix_caching=False)
    runner = PageRunner(page_size=4)
    prompts = {"A": range(7), "B": range(10, 17), "C": range(20, 27)}
    for rid, prompt in prompts.items():
        sched.add_request(make_request(rid, prompt, max_tokens=8))
    trace, outputs = [], {}
    while sched.has_unfinished_requests():
        out, step_outputs = step(sched, runner)
        trace.append((dict(out.num_scheduled_tokens), out.preempted_ids))
        for o in step_outputs:
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert trace == [
        ({"A": 7, "B": 7, "C": 7}, ()),
        ({"A": 1, "B": 1, "C": 1}, ()),
        ({"A": 1, "B": 1}, ("C",)),  # A needs a 3rd page: C (newest) goes; B takes C's other page
        ({"A": 1, "B": 1}, ()),  # C (9 tokens, 3 pages) waits: none free
        ({"A": 1, "B": 1}, ()),
        ({"A": 1, "B": 1}, ()),
        ({"A": 1}, ("B",)),  # A needs a 4th page: B is now the newest
        ({"A": 1}, ()),  # A's 8th token: done
        ({"B": 13}, ()),  # B recomputes prompt + its 6 tokens
        ({"B": 1}, ()),
        ({"C": 9}, ()),  # C recomputes prompt + its 2 tokens
        *[({"C": 1}, ())] * 5,
    ]
    assert outputs == {rid: expected_output(prompt, 8) for rid, prompt in prompts.items()}
    metrics = sched.make_metrics()
    assert metrics.num_preemptions == 2 and metrics.num_finished == 3
    runner.execute(sched.schedule())
    sched.kv.pool.check_leaks()


def test_the_newest_request_preempts_itself_when_it_alone_needs_a_page():
    sched = make_scheduler(num_pages=5, enable_prefix_caching=False)  # 4 usable pages of 4 tokens
    runner = PageRunner(page_size=4)
    sched.add_request(make_request("A", range(5), max_tokens=4))  # 2 pages last it to position 7
    sched.add_request(make_request("B", range(10, 17), max_tokens=4))  # position 8 needs a 3rd page
    trace = []
    while sched.has_unfinished_requests():
        out, _ = step(sched, runner)
        trace.append((dict(out.num_scheduled_tokens), out.preempted_ids))
    assert trace == [
        ({"A": 5, "B": 7}, ()),
        ({"A": 1, "B": 1}, ()),
        ({"A": 1}, ("B",)),  # nobody is newer than B: it steps back, A keeps decoding
        ({"A": 1}, ()),  # B's 9 tokens need 3 pages, 2 are free: it waits; A finishes
        ({"B": 9}, ()),
        ({"B": 1}, ()),
    ]


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(max_num_batched_tokens=256, max_prefill_chunk=512).validate()
    assert err.value.param == "max_prefill_chunk"
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(max_num_seqs=300, max_num_batched_tokens=256, max_prefill_chunk=256).validate()
    assert err.value.param == "max_num_seqs"
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(max_model_len=0).validate()
    assert (err.value.param, str(err.value)) == ("max_model_len", "`max_model_len` must be a positive integer, got 0")
    with pytest.raises(ConfigError) as err:
        CacheConfig(page_size=12).validate()
    assert err.value.param == "page_size"
    with pytest.raises(ConfigError) as err:
        CacheConfig(num_pages=1).validate()
    assert err.value.param == "num_pages"
    with pytest.raises(ConfigError) as err:
        CacheConfig(sliding_window=0).validate()
    assert err.value.param == "sliding_window"
    SchedulerConfig().validate()
    CacheConfig().validate()
    assert CacheConfig(num_pages=1024).num_usable_pages == 1023


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_a_tiny_pool_gives_the_same_outputs_as_a_large_one(enable_prefix_caching):
    shared = list(range(300, 312))
    prompts = {f"r{i}": shared[: 4 * (i % 3)] + list(range(i * 20, i * 20 + 3 + 2 * i)) for i in range(8)}

    def run(num_pages):
        sched = make_scheduler(
            num_pages=num_pages,
            max_num_batched_tokens=24,
            max_prefill_chunk=8,
            enable_prefix_caching=enable_prefix_caching,
        )
        for rid, prompt in prompts.items():
            sched.add_request(make_request(rid, prompt, max_tokens=10))
        outputs = run_to_completion(sched, PageRunner(page_size=4))
        sched.kv.pool.check_leaks()
        return outputs, sched.make_metrics().num_preemptions

    large, large_preemptions = run(200)
    tiny, tiny_preemptions = run(10)
    assert large == {rid: expected_output(p, 10) for rid, p in prompts.items()}
    assert tiny == large
    assert large_preemptions == 0 and tiny_preemptions > 0


@pytest.mark.parametrize(
    "max_tokens, eos, stop_token_ids, expected_tokens, reason, stop_token_id",
    [
        (8, {15}, (), (13, 14, 15), FinishReason.STOP, 15),  # EOS
        (8, (), (14,), (13, 14), FinishReason.STOP, 14),  # stop_token_ids
        (2, {15}, (), (13, 14), FinishReason.LENGTH, None),  # max_tokens
        (3, {15}, (), (13, 14, 15), FinishReason.STOP, 15),  # EOS on the last allowed token: stop wins
    ],
)
def test_stop_conditions(max_tokens, eos, stop_token_ids, expected_tokens, reason, stop_token_id):
    sched = make_scheduler(num_pages=10)
    runner = PageRunner(page_size=4, next_token=lambda tokens: 10 + len(tokens))  # 13, 14, 15, ...
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=max_tokens, eos=eos, stop_token_ids=stop_token_ids))
    outputs = []
    while sched.has_unfinished_requests():
        outputs += step(sched, runner)[1]
    assert tuple(t for o in outputs for t in o.new_token_ids) == expected_tokens
    assert [o.finish_reason for o in outputs] == [None] * (len(expected_tokens) - 1) + [reason]
    assert (outputs[-1].stop_token_id, outputs[-1].num_prompt_tokens, outputs[-1].num_cached_tokens) == (
        stop_token_id,
        3,
        0,
    )
    assert sched.kv.num_used_blocks == 0
    assert sched.schedule().finished_ids == {"a"}
    sched.kv.pool.check_leaks()


def test_a_token_sampled_mid_prefill_is_discarded():
    sched = make_scheduler(num_pages=20, max_num_batched_tokens=8, max_prefill_chunk=8)
    runner = PageRunner(page_size=4, sample_every_row=True)  # returns token 7 for partial rows
    prompt = list(range(20))
    sched.add_request(make_request("a", prompt, max_tokens=2))
    produced = [step(sched, runner)[1] for _ in range(3)]
    assert [len(p) for p in produced] == [0, 0, 1]
    assert produced[2][0].new_token_ids == (expected_output(prompt, 1)[0],)


@pytest.mark.parametrize("when", ["mid_prefill", "mid_decode", "between_schedule_and_update"])
def test_abort_frees_every_page(when):
    sched = make_scheduler(num_pages=20, max_num_batched_tokens=8, max_prefill_chunk=8)
    runner = PageRunner(page_size=4)
    sched.add_request(make_request("a", range(20), max_tokens=5))
    sched.add_request(make_request("b", range(50, 53), max_tokens=30))
    num_steps = {"mid_prefill": 1, "mid_decode": 4, "between_schedule_and_update": 1}[when]
    for _ in range(num_steps):
        step(sched, runner)
    assert sched.requests["a"].status is RequestStatus.RUNNING
    assert (sched.requests["a"].num_computed_tokens < 20) == (when != "mid_decode")
    if when == "between_schedule_and_update":
        out = sched.schedule()
        assert sched.abort_request("a") is True
        outputs = sched.update_from_output(out, runner.execute(out))
        assert "a" not in [o.request_id for o in outputs]
    else:
        assert sched.abort_request("a") is True
    assert sched.abort_request("a") is False
    assert sched.kv.get_block_ids("a") == []
    assert sched.schedule().finished_ids == {"a"}
    sched.abort_request("b")
    sched.kv.pool.check_leaks()


def test_abort_of_a_waiting_request_is_not_reported_to_the_runner():
    sched = make_scheduler(num_pages=20, max_num_seqs=1)
    sched.add_request(make_request("a", range(4)))
    sched.add_request(make_request("b", range(4)))
    sched.schedule()
    assert sched.abort_request("b") is True
    assert sched.schedule().finished_ids == frozenset()
    assert sched.make_metrics().num_finished == 1


def test_add_request_refuses_what_can_never_complete():
    sched = make_scheduler(num_pages=5, max_model_len=32)  # 4 usable pages of 4 tokens
    with pytest.raises(ContextLengthError) as err:
        sched.add_request(make_request("a", range(30), max_tokens=4))
    assert err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    assert str(err.value) == (
        "this model's maximum context length is 32 tokens, but 34 were requested "
        "(30 in the prompt, 4 for the completion)"
    )
    with pytest.raises(ContextLengthError) as err:
        sched.add_request(make_request("a", range(32), max_tokens=1))
    assert err.value.param == "prompt"
    with pytest.raises(ContextLengthError) as err:
        sched.add_request(make_request("a", range(10), max_tokens=8))  # 17 tokens of KV: 5 pages
    assert err.value.param == "max_tokens"
    assert str(err.value) == (
        "the request needs 5 KV pages (10 prompt + 8 completion tokens) but the KV cache has 4; "
        "lower max_tokens or give the cache more memory"
    )
    sched.add_request(make_request("a", range(10), max_tokens=7))  # 16 tokens of KV: fits
    with pytest.raises(InvalidRequestError) as err:
        sched.add_request(make_request("a", range(3), max_tokens=1))
    assert err.value.param == "request_id"
    with pytest.raises(InvalidRequestError) as err:
        EngineRequest("b", (), SamplingParams(), arrival_time=0.0)
    assert err.value.param == "prompt"
    assert list(sched.requests) == ["a"]


def test_prefix_cache_hit_across_requests_through_the_scheduler():
    sched = make_scheduler(num_pages=40)
    runner = PageRunner(page_size=4)
    first = list(range(40))
    sched.add_request(make_request("a", first, max_tokens=3))
    run_to_completion(sched, runner)
    second = first[:32] + [900, 901, 902, 903, 904]
    sched.add_request(make_request("b", second, max_tokens=3))
    out, outputs = step(sched, runner)
    (new,) = out.scheduled_new_reqs
    assert (new.num_computed_tokens, out.num_scheduled_tokens) == (32, {"b": 5})
    assert new.block_ids[:8] == (1, 2, 3, 4, 5, 6, 7, 8)  # a's first pages, shared
    assert (outputs[0].num_cached_tokens, outputs[0].new_token_ids) == (32, (expected_output(second, 1)[0],))
    metrics = sched.make_metrics()
    assert (metrics.prefix_cache_queried_tokens, metrics.prefix_cache_hit_tokens) == (77, 32)


def test_metrics_snapshot_and_request_timings():
    now = [0.0]
    sched = make_scheduler(num_pages=10, clock=lambda: now[0])
    runner = PageRunner(page_size=4)
    sched.add_request(make_request("a", range(5), max_tokens=3, arrival_time=1.0))
    sched.add_request(make_request("b", range(10, 15), max_tokens=3, arrival_time=1.0))
    for t in (1.5, 1.75, 2.25):
        out = sched.schedule()
        if t == 1.5:
            metrics = sched.make_metrics()
            assert (metrics.num_waiting, metrics.num_running, metrics.num_pages_used, metrics.num_pages_total) == (
                0,
                2,
                4,
                9,
            )
        now[0] = t
        sched.update_from_output(out, runner.execute(out))
    (timing_a, timing_b) = sched.make_metrics().recent_timings
    assert timing_a.request_id == "a" and timing_a.ttft == 0.5
    assert timing_a.inter_token_times == (0.25, 0.5)
    assert (timing_a.finish_time, timing_a.num_output_tokens, timing_a.finish_reason) == (2.25, 3, "length")
    assert (timing_b.request_id, timing_b.ttft, timing_b.inter_token_times) == ("b", 0.5, (0.25, 0.5))
    assert sched.make_metrics().kv_usage == 0.0


@pytest.mark.parametrize("sliding_window", [None, 9])
def test_random_arrivals_aborts_and_finishes_leak_nothing(sliding_window):
    rng = random.Random(1234)
    sched = make_scheduler(
        num_pages=24, max_num_batched_tokens=20, max_prefill_chunk=12, max_model_len=64, sliding_window=sliding_window
    )
    runner = PageRunner(page_size=4, sliding_window=sliding_window)
    prefixes = [list(range(500, 516)), list(range(600, 608)), []]
    submitted: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    while len(submitted) < 200 or sched.has_unfinished_requests():
        if len(submitted) < 200 and rng.random() < 0.6:
            rid = f"r{len(submitted)}"
            prompt = rng.choice(prefixes) + [rng.randrange(400) for _ in range(rng.randint(1, 24))]
            submitted[rid] = (prompt, rng.randint(1, 12))
            sched.add_request(make_request(rid, prompt, max_tokens=submitted[rid][1]))
        if sched.requests and rng.random() < 0.08:
            victim = rng.choice(sorted(sched.requests))
            assert sched.abort_request(victim) is True
            aborted.add(victim)
        out = sched.schedule()
        runner_output = runner.execute(out)
        for o in sched.update_from_output(out, runner_output):
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished.add(o.request_id)
    runner.execute(sched.schedule())
    assert finished | aborted == set(submitted) and not finished & aborted
    for rid in finished:
        assert outputs[rid] == expected_output(*submitted[rid]), rid
    metrics = sched.make_metrics()
    assert metrics.num_finished == 200 and (metrics.num_running, metrics.num_waiting) == (0, 0)
    assert metrics.num_preemptions > 0  # the pool is small enough that the run exercised preemption
    assert runner.seqs == {}
    sched.kv.pool.check_leaks()
