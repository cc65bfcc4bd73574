"""BlockPool: the KV pages as block ids, with ref counts, an LRU free queue and a hash -> block map
(layer L1: no mlx; the arrays behind the ids live in kv/paged_store.py).

Block 0 is the null block: never handed out, never freed. Block tables point at it for slots that
hold nothing (pages that fell out of a sliding window).

Free queue (doubly linked, O(1) removal from the middle):

    head -> [least recently freed] <-> ... <-> [most recently freed] <- tail
            allocation pops here                freeing appends here

A freed block keeps its hash and stays in ``hash -> block`` while it waits in the queue, so a later
request with the same prefix can take it back (``touch``). It is evicted lazily: only when
``get_new_blocks`` pops it for someone else is its hash dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from mlxserve.kv.hashing import BlockHash

__all__ = ["NULL_BLOCK_ID", "BlockPool", "FreeBlockQueue", "KVBlock"]

NULL_BLOCK_ID = 0


@dataclass(slots=True, eq=False)
class KVBlock:
    """One page. ``eq=False``: blocks compare by identity, which the linked list relies on."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)

    @property
    def is_null(self) -> bool:
        return self.block_id == NULL_BLOCK_ID


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinel ends; a block links into at most one queue."""

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("pop from an empty FreeBlockQueue")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, f"{block} is not in the queue"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1

    def append(self, block: KVBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} is already queued"
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self._len += 1


class BlockPool:
    """``num_blocks`` pages of which ``num_blocks - 1`` are usable (block 0 is the null block)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a BlockPool needs at least 2 blocks (1 is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self._hash_to_block: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse the page

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        """Blocks nobody references, cached ones included (they are evictable)."""
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some request, in [0, 1]."""
        return 1.0 - self.get_num_free_blocks() / self.num_usable_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Pop ``num_blocks`` from the head of the free queue (evicting their hashes), ref_cnt 1 each.
        The caller checks ``get_num_free_blocks()`` first: running out here is a bug."""
        if num_blocks > len(self.free_queue):
            raise RuntimeError(f"asked for {num_blocks} blocks, only {len(self.free_queue)} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            assert block.ref_cnt == 0, block
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._hash_to_block.get(block.block_hash) is block:
            del self._hash_to_block[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on each block (a prefix hit); free ones leave the free queue."""
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block; those reaching 0 join the tail of the free queue in the
        given order, so the first given is evicted first. The manager passes a block table reversed."""
        for block in ordered_blocks:
            if block.is_null:
                continue
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_full_blocks(
        self, blocks: Sequence[KVBlock], block_hashes: Sequence[BlockHash], num_cached: int, num_full: int
    ) -> None:
        """Give hashes to ``blocks[num_cached:num_full]`` (full, computed) and register them.

        A block whose hash another block already holds stays unhashed: it was computed twice
        (two requests prefilled the same prefix in the same step) and is freed as a plain block.
        """
        for i in range(num_cached, num_full):
            block = blocks[i]
            if block.is_null or block.block_hash is not None:
                continue  # out of a sliding window, or hit from the cache
            block_hash = block_hashes[i]
            if block_hash not in self._hash_to_block:
                block.block_hash = block_hash
                self._hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every hash. Refused (returns False) while any block is in use."""
        if self.get_num_free_blocks() != self.num_usable_blocks:
            return False
        for block in self._hash_to_block.values():
            block.block_hash = None
        self._hash_to_block.clear()
        return True

    def check_leaks(self) -> None:
        """Call when no request is alive: every usable block must be free and consistent.
        Raises AssertionError (explicitly, so it also runs under ``python -O``) naming the culprits."""
        problems = []
        leaked = [(b.block_id, b.ref_cnt) for b in self.blocks[1:] if b.ref_cnt != 0]
        if leaked:
            problems.append(f"blocks still referenced (block_id, ref_cnt): {leaked}")
        if self.null_block.ref_cnt != 0 or self.null_block.prev_free is not None:
            problems.append("the null block was referenced or queued")
        queued = [b.block_id for b in self.free_queue]
        if sorted(queued) != list(range(1, self.num_blocks)):
            missing = sorted(set(range(1, self.num_blocks)) - set(queued))
            problems.append(f"free queue holds {len(queued)} of {self.num_usable_blocks} blocks; missing {missing}")
        stale = [h for h, b in self._hash_to_block.items() if b.block_hash != h]
        if stale:
            problems.append(f"{len(stale)} hash map entries point at blocks with another hash")
        if problems:
            raise AssertionError("KV block leak: " + "; ".join(problems))
