"""Block keys: vLLM's prefix-cache block hashes, computed from token ids.

vLLM (v1 engine) hashes each *full* block of `block_size` tokens as

    hash_i = H((hash_{i-1}, tuple(tokens of block i), extra_keys_i))
    hash_{-1} = NONE_HASH = H(PYTHONHASHSEED)        # the seed as a str

where H is `--prefix-caching-hash-algo` (serializer + digest):

    sha256       pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) -> SHA-256 (vLLM's default)
    sha256_cbor  cbor2.dumps(x, canonical=True)                    -> SHA-256
    xxhash       pickle (as above)                                 -> xxh3_128
    xxhash_cbor  canonical CBOR (as above)                         -> xxh3_128

and extra_keys_i is None, or the tuple of: the LoRA adapter's name (every block), then the
request's cache_salt (first block only). Multimodal and prompt-embedding keys are not computed
here (epp routes text). A partial last block has no hash.

The KV events carry the digest (bytes) or, with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, its low 64
bits as an integer. epp's *block key* is that 64-bit integer: the digest's last 8 bytes read
big-endian (`key_of`), so both forms of an event and epp's own computation give the same key.
Without PYTHONHASHSEED vLLM draws a random seed per process and no router can reproduce its
hashes: set the same PYTHONHASHSEED on every vLLM pod and `hashSeed` in epp.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Final

import cbor2
import xxhash

HASH_ALGOS: Final = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_HASH_ALGO: Final = "sha256"  # vLLM's --prefix-caching-hash-algo default
DEFAULT_BLOCK_SIZE: Final = 16  # vLLM's default --block-size (and llm-d's blockSize default)
_MASK64: Final = (1 << 64) - 1

HashFn = Callable[[Any], bytes]


def _pickled(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _xxh3_128(data: bytes) -> bytes:
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest


_HASH_FNS: Final[dict[str, HashFn]] = {
    "sha256": lambda v: hashlib.sha256(_pickled(v)).digest(),
    "sha256_cbor": lambda v: hashlib.sha256(_cbor(v)).digest(),
    "xxhash": lambda v: _xxh3_128(_pickled(v)),
    "xxhash_cbor": lambda v: _xxh3_128(_cbor(v)),
}


def hash_function(algo: str) -> HashFn:
    """vLLM's hash function named `algo` (one of HASH_ALGOS); ValueError otherwise."""
    try:
        return _HASH_FNS[algo]
    except KeyError:
        expected = ", ".join(HASH_ALGOS)
        raise ValueError(f"unknown hash algorithm {algo!r}: expected one of {expected}") from None


def none_hash(hash_seed: str, algo: str = DEFAULT_HASH_ALGO) -> bytes:
    """The parent of a sequence's first block: vLLM's NONE_HASH for PYTHONHASHSEED=`hash_seed`."""
    return hash_function(algo)(hash_seed)


def key_of(engine_hash: bytes | int) -> int:
    """The block key of a hash as a KV event carries it: the low 64 bits (the digest's last 8 bytes,
    big-endian), as vLLM's integer form and llm-d both take it."""
    if isinstance(engine_hash, int):
        return engine_hash & _MASK64
    return int.from_bytes(engine_hash[-8:], "big")


def extra_keys_for_block(index: int, lora_name: str | None, cache_salt: str | None) -> tuple[str, ...] | None:
    """vLLM's extra keys of block `index` for a text request: (lora_name?, cache_salt if first)."""
    keys: list[str] = []
    if lora_name:
        keys.append(lora_name)
    if cache_salt and index == 0:
        keys.append(cache_salt)
    return tuple(keys) if keys else None


def block_hashes(
    token_ids: Sequence[int],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    hash_seed: str = "",
    algo: str = DEFAULT_HASH_ALGO,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """vLLM's block hashes (digests) of the full blocks of `token_ids`. `parent` continues a chain
    (the hash of the block before `token_ids[0]`; then no block is the first for cache_salt)."""
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    fn = hash_function(algo)
    previous = parent if parent else fn(hash_seed)
    first_index = 1 if parent else 0
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = tuple(token_ids[start : start + block_size])
        extra = extra_keys_for_block(first_index + len(hashes), lora_name, cache_salt)
        previous = fn((previous, block, extra))
        hashes.append(previous)
    return hashes


def block_keys(
    token_ids: Sequence[int],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    hash_seed: str = "",
    algo: str = DEFAULT_HASH_ALGO,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """The block keys (64-bit, see `key_of`) of the full blocks of `token_ids`, equal to the keys
    of the BlockStored events a vLLM engine with the same block size, PYTHONHASHSEED and hash
    algorithm publishes for them."""
    return [
        key_of(h)
        for h in block_hashes(
            token_ids,
            block_size=block_size,
            hash_seed=hash_seed,
            algo=algo,
            lora_name=lora_name,
            cache_salt=cache_salt,
        )
    ]
