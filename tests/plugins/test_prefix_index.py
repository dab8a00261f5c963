"""Prompt hashing and the approximate prefix index, against the reference formulas."""

from __future__ import annotations

import xxhash

from epp.framework import Api, InferenceRequest
from epp_scorers.producers.prefix_index import PrefixIndex, PromptHasher


def reference_hashes(model: str, text: str, block: int, max_blocks: int, salt: str = "") -> list[int]:
    """seed = xxh64(model [+ salt]); h_i = xxh64(block_i + h_{i-1} as 8 bytes little endian)."""
    data = text.encode()[: block * max_blocks]
    prev = xxhash.xxh64_intdigest((model + salt).encode())
    out = []
    for i in range(0, len(data) - block + 1, block):
        prev = xxhash.xxh64_intdigest(data[i : i + block] + prev.to_bytes(8, "little"))
        out.append(prev)
    return out


def test_hashes_follow_the_chained_formula() -> None:
    hasher = PromptHasher()
    text = "The quick brown fox jumps over the lazy dog. " * 40
    assert hasher.block_hashes("llama", text, 64, 256) == reference_hashes("llama", text, 64, 256)
    assert len(hasher.block_hashes("llama", text, 64, 256)) == len(text) // 64


def test_partial_block_ignored_short_prompt_gives_nothing_and_cap_applies() -> None:
    hasher = PromptHasher()
    assert hasher.block_hashes("m", "x" * 63, 64, 256) == []
    assert len(hasher.block_hashes("m", "x" * 130, 64, 256)) == 2
    assert len(hasher.block_hashes("m", "y" * 64 * 300, 64, 256)) == 256


def test_model_and_salt_change_every_hash_and_chain_covers_the_prefix() -> None:
    hasher = PromptHasher()
    text = "a" * 64 + "b" * 64
    base = hasher.block_hashes("m1", text, 64, 256)
    assert not set(base) & set(hasher.block_hashes("m2", text, 64, 256))
    assert not set(base) & set(hasher.block_hashes("m1", text, 64, 256, cache_salt="tenant"))
    assert hasher.block_hashes("m1", text, 64, 256, cache_salt="t") == reference_hashes(
        "m1", text, 64, 256, "t"
    )
    # Same second block, different first block: the second hash differs too (it is chained).
    other = hasher.block_hashes("m1", "c" * 64 + "b" * 64, 64, 256)
    assert other[1] != base[1]


def test_match_walks_until_a_block_no_endpoint_holds() -> None:
    index = PrefixIndex()
    index.add("a", [1, 2, 3])
    index.add("b", [1, 2])
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.match([9, 1, 2]) == {}
    assert index.match([]) == {}


def test_lru_eviction_removes_reverse_entries() -> None:
    index = PrefixIndex(default_capacity=3)
    index.add("a", [1, 2, 3])
    index.add("a", [1])  # touch 1: now 2 is the oldest
    index.add("a", [4])
    assert index.match([2]) == {}
    assert index.match([1]) == {"a": 1}
    assert index.entries() == 3 and len(index) == 3


def test_capacity_from_server_shrinks_and_removal_purges() -> None:
    index = PrefixIndex()
    index.add("a", list(range(10)))
    index.add("b", list(range(5)))
    index.set_capacity("a", 4)
    assert index.entries() == 4 + 5
    assert index.match([6, 7, 8, 9]) == {"a": 4}
    index.remove_endpoint("b")
    assert index.match([0]) == {}
    assert len(index) == 4
    index.remove_endpoint("missing")  # harmless


def test_token_estimate_and_blocks_both_count_utf8_bytes() -> None:
    text = "模型" * 2000  # 4,000 characters, 12,000 UTF-8 bytes
    request = InferenceRequest("r", "m", Api.COMPLETIONS, text, {}, {})
    assert request.input_tokens_estimate == 3000
    blocks = PromptHasher().block_hashes("m", request.prompt_bytes, 256, 10_000)
    assert len(blocks) * 256 // 4 <= request.input_tokens_estimate < (len(blocks) + 1) * 256 // 4
