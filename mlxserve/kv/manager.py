"""KVCacheManager: block tables per request on top of a BlockPool (layer L1: no mlx, no engine).

It sees requests only through :class:`SequenceView`, so the scheduler's Request (or a test's fake)
plugs in without this module importing ``mlxserve.engine``.

One block table per request, shared by every layer:

    tokens:  |<---- num_computed_tokens ---->|<-- hit (prefix cache) -->|<-- num_new_tokens -->|
    table:   [ blocks already held ......... ][ touched cached blocks ..][ fresh blocks ........]

With ``sliding_window`` set, blocks wholly before the window of the next token to compute are
freed and their table entries point at the null block:

    table:   [ null | null | b7 | b8 | b9 ]      window covers positions in b7..b9

NOTE(kv): one table for all layers. Models mixing local and global layers (gemma2/3) must run with
``sliding_window=None`` (local layers mask the window in attention; their pages are kept). Freeing
local-layer pages needs one table per layer group over a shared pool (vLLM's hybrid allocator): a
second manager per group with this same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mlxserve.kv.block_pool import BlockPool, KVBlock
from mlxserve.kv.hashing import BlockHash, extra_keys_for, hash_full_blocks

__all__ = ["KVBlocks", "KVCacheManager", "SequenceView"]


class SequenceView(Protocol):
    """What the manager reads from a request. ``block_hashes`` is a cache the manager extends."""

    @property
    def request_id(self) -> str: ...
    @property
    def all_token_ids(self) -> Sequence[int]: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def adapter_id(self) -> str | None: ...
    @property
    def cache_salt(self) -> str | None: ...
    @property
    def block_hashes(self) -> list[BlockHash]: ...


@dataclass(slots=True)
class KVBlocks:
    """Blocks handed between the manager and the scheduler (a prefix hit, or fresh blocks)."""

    blocks: list[KVBlock] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        pool: BlockPool,
        page_size: int,
        *,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        self.pool = pool
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self._tables: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # table prefix already registered as cached

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_usable_blocks - self.pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(request_id, ())]

    def num_blocks_needed(self, num_tokens: int, max_step_tokens: int) -> int:
        """Most blocks a request of ``num_tokens`` tokens ever holds at once, computing at most
        ``max_step_tokens`` per step; the scheduler refuses requests that exceed the pool."""
        full = _cdiv(num_tokens, self.page_size)
        if self.sliding_window is None:
            return full
        # Live span: window - 1 earlier positions plus this step's tokens, possibly straddling.
        return min(full, _cdiv(self.sliding_window - 1 + max_step_tokens, self.page_size) + 1)

    # ---- prefix cache --------------------------------------------------------------------

    def _block_hashes(self, seq: SequenceView) -> list[BlockHash]:
        extra = extra_keys_for(seq.adapter_id, seq.cache_salt)
        return hash_full_blocks(seq.all_token_ids, self.page_size, extra, seq.block_hashes)

    def get_computed_blocks(self, seq: SequenceView) -> tuple[KVBlocks, int]:
        """Longest run of cached full blocks from the start of ``seq``; (blocks, num_hit_tokens).
        The blocks are not referenced yet: pass them to ``allocate_slots``."""
        if not self.enable_prefix_caching:
            return KVBlocks(), 0
        hashes = self._block_hashes(seq)
        # Recompute the last token even on a full hit: its logits seed the next sample.
        max_hit_blocks = (seq.num_tokens - 1) // self.page_size
        hit: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block)
        return KVBlocks(hit), len(hit) * self.page_size

    def cache_blocks(self, seq: SequenceView, num_computed_tokens: int) -> None:
        """Register the full blocks whose KV is now computed, for later prefix hits."""
        table = self._tables.get(seq.request_id)
        if not self.enable_prefix_caching or not table:
            return
        num_full = min(num_computed_tokens // self.page_size, len(table))
        num_cached = self._num_cached_blocks.get(seq.request_id, 0)
        if num_full <= num_cached:
            return
        self.pool.cache_full_blocks(table, self._block_hashes(seq), num_cached, num_full)
        self._num_cached_blocks[seq.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # ---- allocation ----------------------------------------------------------------------

    def allocate_slots(
        self, seq: SequenceView, num_new_tokens: int, new_computed_blocks: KVBlocks | None = None
    ) -> KVBlocks | None:
        """Make room for ``num_new_tokens`` after ``seq.num_computed_tokens`` plus the prefix hit
        ``new_computed_blocks`` (a fresh request's, from ``get_computed_blocks``).

        Returns the newly allocated blocks (appended to the table), or None when the pool cannot
        supply them even by evicting unreferenced cached blocks; then nothing was taken (pages
        that fell out of a sliding window may have been released, which is always safe).
        """
        assert num_new_tokens > 0, num_new_tokens
        hit = list(new_computed_blocks.blocks) if new_computed_blocks is not None else []
        table = self._tables.get(seq.request_id, [])
        assert not hit or not table, "a prefix hit is only for a request holding no blocks"
        num_computed = seq.num_computed_tokens + len(hit) * self.page_size
        num_skipped = self._num_skipped_blocks(num_computed)
        self._free_skipped(table, num_skipped)
        null = self.pool.null_block
        hit = [null if len(table) + i < num_skipped else b for i, b in enumerate(hit)]

        num_required = _cdiv(num_computed + num_new_tokens, self.page_size)
        num_new_blocks = max(0, num_required - len(table) - len(hit))
        num_hit_in_free_queue = sum(1 for b in hit if b.ref_cnt == 0 and not b.is_null)
        if num_new_blocks > self.pool.get_num_free_blocks() - num_hit_in_free_queue:
            return None

        self.pool.touch(hit)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        table.extend(hit)
        table.extend(new_blocks)
        self._tables[seq.request_id] = table
        if hit and self.enable_prefix_caching:
            self._num_cached_blocks[seq.request_id] = len(hit)
        return KVBlocks(new_blocks)

    def free(self, seq: SequenceView) -> None:
        """Release every block of ``seq``. Tail blocks are freed first so they are evicted first:
        a prefix's head is worth more (every longer prefix goes through it)."""
        table = self._tables.pop(seq.request_id, None)
        self._num_cached_blocks.pop(seq.request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def _num_skipped_blocks(self, num_computed: int) -> int:
        """Leading blocks that no query from position ``num_computed`` on can attend to."""
        if self.sliding_window is None:
            return 0
        first_needed = num_computed - self.sliding_window + 1  # earliest key position in the window
        return max(0, first_needed // self.page_size)

    def _free_skipped(self, table: list[KVBlock], num_skipped: int) -> None:
        # Skipped entries form a prefix of nulls: walk back from the boundary to the last null.
        freed = []
        for i in range(min(num_skipped, len(table)) - 1, -1, -1):
            if table[i].is_null:
                break
            freed.append(table[i])
            table[i] = self.pool.null_block
        self.pool.free_blocks(freed)  # tail first, as in free()
