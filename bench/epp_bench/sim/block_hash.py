"""vLLM's prefix-cache block hashes, computed from token ids as vLLM's v1 engine computes them.

Each full block of `block_size` tokens is hashed with its parent's hash:

    hash_0 = H((NONE_HASH, tuple(tokens of block 0), extra_keys_0))
    hash_i = H((hash_{i-1}, tuple(tokens of block i), extra_keys_i))
    NONE_HASH = H(PYTHONHASHSEED as a str); a random 32 bytes when the variable is unset

H is vLLM's `--prefix-caching-hash-algo`: `sha256` (pickle, highest protocol, then SHA-256; vLLM's
default), `sha256_cbor` (canonical CBOR, then SHA-256), `xxhash` / `xxhash_cbor` (the same
serializations, then xxh3-128). extra_keys is None, or the tuple of the LoRA adapter's name (every
block) and the request's cache_salt (first block only). A partial last block has no hash.

KV events carry the digest, or by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1) its low 64 bits as
an unsigned integer (`external`). The simulator keys its own cache by the digest, so the blocks it
reports are exactly the blocks it holds.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Final

import cbor2
import xxhash

HASH_ALGOS: Final = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
_LOW_64: Final = (1 << 64) - 1

HashFn = Callable[[Any], bytes]


def _pickle(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _xxh3_128(data: bytes) -> bytes:
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest


_FUNCTIONS: Final[dict[str, HashFn]] = {
    "sha256": lambda value: hashlib.sha256(_pickle(value)).digest(),
    "sha256_cbor": lambda value: hashlib.sha256(_cbor(value)).digest(),
    "xxhash": lambda value: _xxh3_128(_pickle(value)),
    "xxhash_cbor": lambda value: _xxh3_128(_cbor(value)),
}


def hash_function(algo: str) -> HashFn:
    try:
        return _FUNCTIONS[algo]
    except KeyError:
        known = ", ".join(HASH_ALGOS)
        raise ValueError(f"unknown prefix caching hash algorithm {algo!r}; one of {known}") from None


def none_hash(algo: str, seed: str | None) -> bytes:
    """The parent of every first block. `seed` None: PYTHONHASHSEED, else random, as vLLM does."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED")
    if seed is None:
        return os.urandom(32)
    return hash_function(algo)(seed)


def external(block_hash: bytes, as_int: bool) -> bytes | int:
    """A hash as a KV event carries it: the digest, or its low 64 bits (big-endian) as an int."""
    return int.from_bytes(block_hash, "big") & _LOW_64 if as_int else block_hash


class BlockHasher:
    """Chained block hashes of token ids for one engine: its algorithm, seed and block size."""

    def __init__(self, algo: str = "sha256", seed: str | None = None, block_size: int = 16) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.algo = algo
        self.block_size = block_size
        self._fn = hash_function(algo)
        self.none_hash = none_hash(algo, seed)

    def hashes(
        self,
        token_ids: Sequence[int],
        parent: bytes | None = None,
        start_block: int = 0,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[bytes]:
        """Hashes of the full blocks of `token_ids` from `start_block` on, chained from `parent` (the
        hash of block start_block - 1; None for the start of a sequence)."""
        size, fn = self.block_size, self._fn
        prev = parent or self.none_hash
        out: list[bytes] = []
        for start in range(start_block * size, len(token_ids) - size + 1, size):
            keys: list[str] = [lora_name] if lora_name else []
            if start == 0 and cache_salt:
                keys.append(cache_salt)
            prev = fn((prev, tuple(token_ids[start : start + size]), tuple(keys) if keys else None))
            out.append(prev)
        return out
