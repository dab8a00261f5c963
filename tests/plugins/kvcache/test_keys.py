"""Block keys are vLLM's block hashes: spelled out here from vLLM's definition, for each algorithm."""

from __future__ import annotations

import hashlib
import pickle

import cbor2
import pytest
import xxhash

from epp_scorers.kvcache.keys import HASH_ALGOS, block_hashes, block_keys, hash_function, key_of, none_hash


def _vllm_sha256(value: object) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def test_the_chain_is_vllms_for_the_default_algorithm() -> None:
    tokens = list(range(100, 140))  # two full blocks of 16 and a partial one
    first = _vllm_sha256((_vllm_sha256("42"), tuple(tokens[:16]), None))
    second = _vllm_sha256((first, tuple(tokens[16:32]), None))
    assert block_hashes(tokens, block_size=16, hash_seed="42") == [first, second]
    assert block_keys(tokens, block_size=16, hash_seed="42") == [
        int.from_bytes(first[-8:], "big"),
        int.from_bytes(second[-8:], "big"),
    ]


def test_cbor_and_xxhash_algorithms_and_extra_keys() -> None:
    tokens = list(range(32))
    root = hashlib.sha256(cbor2.dumps("7", canonical=True)).digest()
    first = hashlib.sha256(cbor2.dumps((root, tuple(tokens[:16]), ("adapter", "salt")), canonical=True))
    second = hashlib.sha256(cbor2.dumps((first.digest(), tuple(tokens[16:]), ("adapter",)), canonical=True))
    got = block_hashes(tokens, hash_seed="7", algo="sha256_cbor", lora_name="adapter", cache_salt="salt")
    assert got == [first.digest(), second.digest()]
    xroot = xxhash.xxh3_128_digest(pickle.dumps("7", protocol=pickle.HIGHEST_PROTOCOL))
    assert none_hash("7", "xxhash") == xroot
    assert len(block_hashes(tokens, hash_seed="7", algo="xxhash_cbor")[0]) == 16


def test_keys_differ_by_seed_salt_lora_and_block_size() -> None:
    tokens = list(range(64))
    base = block_keys(tokens, hash_seed="1")
    assert len(base) == 4 and len(set(base)) == 4
    assert block_keys(tokens, hash_seed="2") != base
    salted = block_keys(tokens, hash_seed="1", cache_salt="s")
    assert all(a != b for a, b in zip(salted, base, strict=True))  # the chain carries the salt on
    assert block_keys(tokens, hash_seed="1", block_size=32) != base[1::2]
    assert block_keys(tokens[:15], hash_seed="1") == []


def test_a_parent_continues_the_chain() -> None:
    tokens = list(range(48))
    whole = block_hashes(tokens, hash_seed="0")
    assert block_hashes(tokens[16:], hash_seed="0", parent=whole[0]) == whole[1:]


def test_both_event_forms_reduce_to_the_same_key() -> None:
    digest = block_hashes(list(range(16)), hash_seed="0")[0]
    as_int = int.from_bytes(digest, "big") & ((1 << 64) - 1)  # vLLM's integer form
    assert key_of(digest) == key_of(as_int) == block_keys(list(range(16)), hash_seed="0")[0]
    assert key_of(-1) == (1 << 64) - 1  # a negative int (signed msgpack) is taken modulo 2^64


def test_bad_parameters_are_refused() -> None:
    assert set(HASH_ALGOS) == {"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"}
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        hash_function("md5")
    with pytest.raises(ValueError, match="block size must be positive"):
        block_keys([1, 2, 3], block_size=0)
