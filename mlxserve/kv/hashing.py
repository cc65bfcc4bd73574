"""Chained hashes of full KV blocks, for prefix caching (layer L1: stdlib only).

A block's hash covers its parent's hash, its own token ids and the extra keys (adapter id, cache
salt), so two blocks share a hash only when everything before them matched too:

    h0 = H(ROOT_HASH, tokens[0:16],  extra)      page_size = 16
    h1 = H(h0,        tokens[16:32], extra)
    ...                                          a partial last block gets no hash

Hashes are sha256 over a canonical byte encoding, truncated to 64 bits, so they are the same in
every process and on every machine (Python's ``hash`` is salted per process).
NOTE(kv): 64-bit hashes collide with probability about n**2 / 2**65 for n cached blocks
(about 1e-7 for ten million blocks); the pool does not compare token ids on a hit.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["ROOT_HASH", "BlockHash", "extra_keys_for", "hash_block_tokens", "hash_full_blocks"]

BlockHash = int  # 64-bit unsigned

_TOKEN_FORMAT = "<{}q"  # little-endian int64 per token id, whatever the host's byte order


def _digest64(data: bytes) -> BlockHash:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


ROOT_HASH: BlockHash = _digest64(b"mlxserve.kv.root.v1")  # parent of every first block


def extra_keys_for(adapter_id: str | None, cache_salt: str | None) -> tuple[str | None, ...]:
    """The keys besides token ids that decide whether two blocks may share KV."""
    return (adapter_id, cache_salt)


def _encode_extra(extra_keys: Sequence[str | None]) -> bytes:
    # Length-prefixed so ("ab", None) and ("a", "b") never encode alike; None differs from "".
    parts = []
    for key in extra_keys:
        if key is None:
            parts.append(b"\x00")
        else:
            raw = key.encode("utf-8")
            parts.append(b"\x01" + struct.pack("<I", len(raw)) + raw)
    return struct.pack("<I", len(extra_keys)) + b"".join(parts)


def hash_block_tokens(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: Sequence[str | None] = ()
) -> BlockHash:
    """Hash of one full block: parent hash, then the block's token ids, then the extra keys."""
    header = struct.pack("<QI", parent_hash, len(token_ids))
    tokens = struct.pack(_TOKEN_FORMAT.format(len(token_ids)), *token_ids)
    return _digest64(header + tokens + _encode_extra(extra_keys))


def hash_full_blocks(
    token_ids: Sequence[int],
    page_size: int,
    extra_keys: Sequence[str | None],
    known: list[BlockHash],
) -> list[BlockHash]:
    """Extend ``known`` (the hashes of the first blocks, computed earlier) in place with the hashes
    of every further full block of ``token_ids``; returns ``known``. Partial blocks are skipped."""
    num_full = len(token_ids) // page_size
    parent = known[-1] if known else ROOT_HASH
    for i in range(len(known), num_full):
        parent = hash_block_tokens(parent, token_ids[i * page_size : (i + 1) * page_size], extra_keys)
        known.append(parent)
    return known
