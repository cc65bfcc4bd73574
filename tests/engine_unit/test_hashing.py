"""Chained block hashes: stable across processes, chained, keyed by adapter and cache salt."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlxserve.kv.hashing import ROOT_HASH, extra_keys_for, hash_block_tokens, hash_full_blocks

NO_EXTRA = extra_keys_for(None, None)


def test_hash_is_a_fixed_64_bit_value():
    # Golden values: a change here invalidates every persisted or cross-process cache key.
    assert ROOT_HASH == 11402123842040810998
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], NO_EXTRA) == 6849331538334996895
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], ("lora-a", "salt")) == 14837093581647242306


def test_hash_is_the_same_in_another_process_with_another_hash_seed():
    code = (
        "from mlxserve.kv.hashing import ROOT_HASH, hash_block_tokens;"
        "print(hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], (None, None)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "6849331538334996895"


def test_parent_hash_chains_blocks():
    block = [5, 6, 7, 8]
    first = hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], NO_EXTRA)
    other_first = hash_block_tokens(ROOT_HASH, [1, 2, 3, 9], NO_EXTRA)
    assert hash_block_tokens(first, block, NO_EXTRA) != hash_block_tokens(other_first, block, NO_EXTRA)
    assert hash_block_tokens(first, block, NO_EXTRA) == hash_block_tokens(first, block, NO_EXTRA)


@pytest.mark.parametrize(
    "extra_a, extra_b",
    [
        ((None, None), ("adapter", None)),  # an adapter never reuses base-model KV
        ((None, None), (None, "salt")),  # a cache salt isolates a tenant
        (("x", None), (None, "x")),  # the same string in another role
        (("ab", None), ("a", "b")),  # length-prefixed: no concatenation clash
        ((None, None), ("", None)),  # "" is not None
    ],
)
def test_extra_keys_isolate_hashes(extra_a, extra_b):
    tokens = [1, 2, 3, 4]
    assert hash_block_tokens(ROOT_HASH, tokens, extra_a) != hash_block_tokens(ROOT_HASH, tokens, extra_b)


def test_token_boundaries_are_unambiguous():
    # Fixed-width encoding: [1, 23] and [12, 3] differ, as do large ids.
    assert hash_block_tokens(ROOT_HASH, [1, 23], NO_EXTRA) != hash_block_tokens(ROOT_HASH, [12, 3], NO_EXTRA)
    assert hash_block_tokens(ROOT_HASH, [2**40], NO_EXTRA) != hash_block_tokens(ROOT_HASH, [0], NO_EXTRA)


def test_hash_full_blocks_skips_the_partial_block_and_extends_incrementally():
    tokens = list(range(10))
    hashes = hash_full_blocks(tokens, 4, NO_EXTRA, [])
    h0 = hash_block_tokens(ROOT_HASH, [0, 1, 2, 3], NO_EXTRA)
    h1 = hash_block_tokens(h0, [4, 5, 6, 7], NO_EXTRA)
    assert hashes == [h0, h1]

    known = hash_full_blocks(tokens[:5], 4, NO_EXTRA, [])
    assert known == [h0]
    assert hash_full_blocks(tokens, 4, NO_EXTRA, known) is known  # extended in place
    assert known == [h0, h1]
    assert hash_full_blocks(tokens + [10, 11], 4, NO_EXTRA, known)[2] == hash_block_tokens(h1, [8, 9, 10, 11], NO_EXTRA)
