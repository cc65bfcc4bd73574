"""BlockPool: exact block ids, ref counts, LRU eviction order, the null block, leak checks."""

from __future__ import annotations

import pytest

from mlxserve.kv.block_pool import BlockPool, FreeBlockQueue, KVBlock


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_fresh_pool_queues_every_block_but_the_null_block():
    pool = BlockPool(6)
    assert ids(pool.free_queue) == [1, 2, 3, 4, 5]
    assert pool.get_num_free_blocks() == 5
    assert pool.num_usable_blocks == 5
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    assert pool.usage == 0.0
    pool.check_leaks()


def test_allocation_pops_from_the_head_and_never_hands_out_the_null_block():
    pool = BlockPool(6)
    assert ids(pool.get_new_blocks(2)) == [1, 2]
    assert ids(pool.get_new_blocks(3)) == [3, 4, 5]
    assert [b.ref_cnt for b in pool.blocks] == [0, 1, 1, 1, 1, 1]
    assert pool.get_num_free_blocks() == 0
    assert pool.usage == 1.0
    with pytest.raises(RuntimeError, match="asked for 1 blocks, only 0 free"):
        pool.get_new_blocks(1)


def test_freed_blocks_go_to_the_tail_in_the_given_order():
    pool = BlockPool(8)
    table = pool.get_new_blocks(4)  # [1, 2, 3, 4]
    pool.free_blocks(reversed(table))
    assert ids(pool.free_queue) == [5, 6, 7, 4, 3, 2, 1]
    assert ids(pool.get_new_blocks(5)) == [5, 6, 7, 4, 3]
    assert ids(pool.free_queue) == [2, 1]


def test_lru_eviction_order_across_finished_requests():
    pool = BlockPool(10)
    a = pool.get_new_blocks(3)  # [1, 2, 3]
    b = pool.get_new_blocks(2)  # [4, 5]
    pool.cache_full_blocks(a, [101, 102, 103], 0, 3)
    pool.cache_full_blocks(b, [201, 202], 0, 2)
    pool.free_blocks(reversed(a))  # a finished first
    pool.free_blocks(reversed(b))
    assert ids(pool.free_queue) == [6, 7, 8, 9, 3, 2, 1, 5, 4]
    assert pool.num_cached_blocks == 5

    # Six new blocks: the never-used ones first, then a's tail blocks, evicting their hashes.
    assert ids(pool.get_new_blocks(6)) == [6, 7, 8, 9, 3, 2]
    assert pool.get_cached_block(103) is None and pool.get_cached_block(102) is None
    assert pool.get_cached_block(101).block_id == 1
    assert pool.get_cached_block(201).block_id == 4
    assert pool.blocks[3].block_hash is None
    assert pool.num_evictions == 2
    assert pool.num_cached_blocks == 3


def test_touch_takes_cached_blocks_out_of_the_middle_of_the_free_queue():
    pool = BlockPool(6)
    table = pool.get_new_blocks(3)  # [1, 2, 3]
    pool.cache_full_blocks(table, [11, 12, 13], 0, 2)  # the last block is partial: no hash
    pool.free_blocks(reversed(table))
    assert ids(pool.free_queue) == [4, 5, 3, 2, 1]

    hit = [pool.get_cached_block(11), pool.get_cached_block(12)]
    pool.touch(hit)
    assert ids(pool.free_queue) == [4, 5, 3]
    assert [b.ref_cnt for b in hit] == [1, 1]
    pool.touch(hit)  # a second request shares the prefix
    assert [b.ref_cnt for b in hit] == [2, 2]

    pool.free_blocks(reversed(hit))
    assert [b.ref_cnt for b in hit] == [1, 1] and ids(pool.free_queue) == [4, 5, 3]
    pool.free_blocks(reversed(hit))
    assert ids(pool.free_queue) == [4, 5, 3, 2, 1]
    assert pool.get_cached_block(11) is pool.blocks[1]  # still cached while free
    pool.check_leaks()


def test_null_block_is_ignored_by_touch_and_free():
    pool = BlockPool(4)
    pool.touch([pool.null_block])
    pool.free_blocks([pool.null_block])
    assert pool.null_block.ref_cnt == 0
    assert ids(pool.free_queue) == [1, 2, 3]
    pool.check_leaks()


def test_double_free_is_a_bug():
    pool = BlockPool(4)
    block = pool.get_new_blocks(1)[0]
    pool.free_blocks([block])
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([block])


def test_a_hash_already_cached_leaves_the_duplicate_block_unhashed():
    pool = BlockPool(6)
    first, second = pool.get_new_blocks(1), pool.get_new_blocks(1)
    pool.cache_full_blocks(first, [77], 0, 1)
    pool.cache_full_blocks(second, [77], 0, 1)
    assert pool.get_cached_block(77) is first[0]
    assert second[0].block_hash is None
    pool.free_blocks(second)
    assert pool.get_new_blocks(4)[-1] is second[0]  # evicting it must not drop 77's entry
    assert pool.get_cached_block(77) is first[0]


def test_check_leaks_names_the_blocks_still_referenced():
    pool = BlockPool(5)
    table = pool.get_new_blocks(3)
    pool.touch(table[1:2])
    with pytest.raises(
        AssertionError, match=r"blocks still referenced \(block_id, ref_cnt\): \[\(1, 1\), \(2, 2\), \(3, 1\)\]"
    ):
        pool.check_leaks()
    pool.free_blocks(reversed(table))
    pool.free_blocks(table[1:2])
    pool.check_leaks()


def test_reset_prefix_cache_only_when_every_block_is_free():
    pool = BlockPool(4)
    table = pool.get_new_blocks(2)
    pool.cache_full_blocks(table, [1, 2], 0, 2)
    assert pool.reset_prefix_cache() is False
    assert pool.num_cached_blocks == 2
    pool.free_blocks(reversed(table))
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0
    assert [b.block_hash for b in pool.blocks] == [None, None, None, None]
    pool.check_leaks()


def test_free_queue_removes_from_the_middle_in_constant_steps():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    queue.append(blocks[2])
    assert ids(queue) == [1, 3, 4, 2] and len(queue) == 4
    assert queue.popleft() is blocks[1]
    with pytest.raises(AssertionError, match="already queued"):
        queue.append(blocks[3])
