"""KVCacheManager: block tables, prefix hits, full-hit recompute, capacity, sliding windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mlxserve.kv.block_pool import BlockPool
from mlxserve.kv.manager import KVBlocks, KVCacheManager


@dataclass
class Seq:
    """A SequenceView without the engine."""

    request_id: str
    all_token_ids: list[int]
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    adapter_id: str | None = None
    cache_salt: str | None = None
    block_hashes: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def make_manager(num_blocks: int, page_size: int = 4, **kw) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), page_size, **kw)


def compute(kv: KVCacheManager, seq: Seq, num_new: int, hit: KVBlocks | None = None, num_hit: int = 0) -> list[int]:
    """The scheduler's part for one step: allocate, then mark computed and cache. Returns new ids."""
    new = kv.allocate_slots(seq, num_new, hit)
    assert new is not None
    seq.num_computed_tokens += num_hit + num_new
    kv.cache_blocks(seq, seq.num_computed_tokens)
    return new.block_ids


def test_allocate_slots_grows_the_table_one_page_at_a_time():
    kv = make_manager(11)
    seq = Seq("a", list(range(10)), num_prompt_tokens=10)
    assert compute(kv, seq, 10) == [1, 2, 3]
    seq.all_token_ids.append(100)
    assert compute(kv, seq, 1) == []  # position 10 fits in page 3
    seq.all_token_ids.append(101)
    assert compute(kv, seq, 1) == []
    seq.all_token_ids.append(102)
    assert compute(kv, seq, 1) == [4]  # position 12 opens a page
    assert kv.get_block_ids("a") == [1, 2, 3, 4]
    assert kv.num_used_blocks == 4 and kv.num_total_blocks == 10


def test_allocate_slots_returns_none_when_full_and_takes_nothing():
    kv = make_manager(5)  # 4 usable pages
    a = Seq("a", list(range(12)))
    assert compute(kv, a, 12) == [1, 2, 3]
    b = Seq("b", list(range(50, 58)))
    assert kv.allocate_slots(b, 8) is None
    assert kv.get_block_ids("b") == []
    assert kv.pool.get_num_free_blocks() == 1
    assert kv.allocate_slots(b, 4).block_ids == [4]


def test_free_puts_the_tail_first_so_it_is_evicted_first():
    kv = make_manager(8)
    seq = Seq("a", list(range(12)))
    compute(kv, seq, 12)
    kv.free(seq)
    assert [b.block_id for b in kv.pool.free_queue] == [4, 5, 6, 7, 3, 2, 1]
    assert kv.get_block_ids("a") == []
    kv.pool.check_leaks()


def test_prefix_hit_across_requests_shares_pages_with_ref_counts():
    kv = make_manager(11)
    a = Seq("a", list(range(10)), num_prompt_tokens=10)
    compute(kv, a, 10)  # pages 1, 2 full and cached; 3 partial
    b = Seq("b", list(range(8)) + [90, 91, 92], num_prompt_tokens=11)
    hit, num_hit = kv.get_computed_blocks(b)
    assert hit.block_ids == [1, 2] and num_hit == 8
    assert compute(kv, b, 3, hit, num_hit) == [4]
    assert kv.get_block_ids("b") == [1, 2, 4]
    assert [kv.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]

    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [1, 1, 0, 1]
    kv.free(b)
    kv.pool.check_leaks()
    # Still cached after both finished: a third request hits pages 1 and 2 again.
    c = Seq("c", list(range(9)), num_prompt_tokens=9)
    assert kv.get_computed_blocks(c)[0].block_ids == [1, 2]


def test_full_hit_recomputes_the_last_token():
    kv = make_manager(11)
    a = Seq("a", list(range(8)), num_prompt_tokens=8)
    compute(kv, a, 8)
    kv.free(a)
    same = Seq("b", list(range(8)), num_prompt_tokens=8)
    hit, num_hit = kv.get_computed_blocks(same)
    assert hit.block_ids == [1] and num_hit == 4  # page 2 is dropped: token 7 needs its logits
    assert compute(kv, same, 4, hit, num_hit) == [3]
    longer = Seq("c", list(range(9)), num_prompt_tokens=9)
    hit, num_hit = kv.get_computed_blocks(longer)
    assert hit.block_ids == [1, 2] and num_hit == 8


def test_hit_blocks_waiting_in_the_free_queue_are_not_counted_twice():
    kv = make_manager(5)  # 4 usable pages
    a = Seq("a", list(range(16)), num_prompt_tokens=16)
    compute(kv, a, 16)
    kv.free(a)  # all 4 pages free and cached
    needs_two = Seq("b", list(range(12)) + [7, 7, 7, 7, 7], num_prompt_tokens=17)
    hit, num_hit = kv.get_computed_blocks(needs_two)
    assert hit.block_ids == [1, 2, 3] and num_hit == 12
    assert kv.allocate_slots(needs_two, 5, hit) is None  # 2 new pages, only page 4 is not in the hit
    assert kv.pool.get_num_free_blocks() == 4 and kv.get_block_ids("b") == []
    needs_one = Seq("c", list(range(12)) + [7], num_prompt_tokens=13)
    hit, num_hit = kv.get_computed_blocks(needs_one)
    assert compute(kv, needs_one, 1, hit, num_hit) == [4]  # evicts page 4's hash
    assert kv.pool.get_cached_block(needs_one.block_hashes[0]).block_id == 1


@pytest.mark.parametrize(
    "keys_b",
    [
        {"adapter_id": "lora-1"},
        {"cache_salt": "tenant-2"},
    ],
)
def test_adapter_and_cache_salt_isolate_prefixes(keys_b):
    kv = make_manager(11)
    a = Seq("a", list(range(10)), num_prompt_tokens=10)
    compute(kv, a, 10)
    b = Seq("b", list(range(10)), num_prompt_tokens=10, **keys_b)
    assert kv.get_computed_blocks(b) == (KVBlocks([]), 0)
    compute(kv, b, 10)
    same_keys = Seq("c", list(range(10)), num_prompt_tokens=10, **keys_b)
    assert kv.get_computed_blocks(same_keys)[0].block_ids == [4, 5]


def test_prefix_caching_off_never_hits_and_never_hashes():
    kv = make_manager(11, enable_prefix_caching=False)
    a = Seq("a", list(range(10)), num_prompt_tokens=10)
    compute(kv, a, 10)
    kv.free(a)
    assert kv.get_computed_blocks(Seq("b", list(range(10)))) == (KVBlocks([]), 0)
    assert kv.pool.num_cached_blocks == 0 and a.block_hashes == []


def test_sliding_window_frees_pages_before_the_window():
    # window 6: a query at position p reads positions p-5 .. p.
    kv = make_manager(11, sliding_window=6)
    seq = Seq("a", list(range(10)), num_prompt_tokens=10)
    assert compute(kv, seq, 10) == [1, 2, 3]
    seq.all_token_ids.append(100)
    compute(kv, seq, 1)  # query at 10 reads 5..10: page 1 (positions 0..3) is out
    assert kv.get_block_ids("a") == [0, 2, 3]
    assert kv.pool.blocks[1].ref_cnt == 0
    seq.all_token_ids += [101, 102]
    compute(kv, seq, 1)  # 11
    compute(kv, seq, 1)  # query at 12 reads 7..12: page 2 (4..7) still needed
    assert kv.get_block_ids("a") == [0, 2, 3, 4]
    seq.all_token_ids.append(103)
    compute(kv, seq, 1)  # query at 13 reads 8..13
    assert kv.get_block_ids("a") == [0, 0, 3, 4]
    kv.free(seq)
    kv.pool.check_leaks()


def test_sliding_window_prefix_hit_skips_pages_outside_the_window():
    kv = make_manager(11, sliding_window=6)
    a = Seq("a", list(range(17)), num_prompt_tokens=17)
    compute(kv, a, 17)  # pages 1..5; 1..4 full and cached
    kv.free(a)
    b = Seq("b", list(range(16)) + [99], num_prompt_tokens=17)
    hit, num_hit = kv.get_computed_blocks(b)
    assert hit.block_ids == [1, 2, 3, 4] and num_hit == 16
    compute(kv, b, 1, hit, num_hit)  # query at 16 reads 11..16: pages 1 and 2 are never touched
    assert kv.get_block_ids("b") == [0, 0, 3, 4, 6]  # 6 heads the free queue; 5 was a's tail
    assert [kv.pool.blocks[i].ref_cnt for i in range(1, 7)] == [0, 0, 1, 1, 0, 1]
    kv.free(b)
    kv.pool.check_leaks()


def test_num_blocks_needed():
    assert make_manager(3).num_blocks_needed(33, max_step_tokens=8) == 9
    windowed = make_manager(3, sliding_window=6)
    assert windowed.num_blocks_needed(1000, max_step_tokens=8) == 5  # cdiv(5 + 8, 4) + 1
    assert windowed.num_blocks_needed(10, max_step_tokens=8) == 3
