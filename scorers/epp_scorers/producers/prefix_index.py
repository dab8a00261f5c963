"""Approximate prefix-cache index: which endpoint has probably seen which prompt prefix.

Prompts are cut into fixed-size blocks of bytes and hashed in a chain (each block's hash covers
every byte before it), exactly as the Go EPP does, so two requests share a block hash only when
they share the whole prefix up to that block:

    seed = xxh64(model)            h_i = xxh64(block_i + h_{i-1} as 8 bytes little endian)

The index maps a block hash to the endpoints that hold it, and keeps one LRU per endpoint with a
bounded capacity (the model server's KV blocks), so memory stays bounded and old blocks age out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import xxhash

CHARS_PER_TOKEN = 4
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250


class PromptHasher:
    """Chained block hashes of a prompt.

    Uses xxhash's one-shot function on `block + previous hash` rather than a reused streaming
    hasher: in Python the per-call overhead dominates, and one call per block (no reset/update/
    digest sequence) measured 2x faster (43 us vs 86 us for a 10 kB prompt). Nothing is allocated
    per request beyond the 64-byte block slices and the result list.
    """

    __slots__ = ()

    def block_hashes(
        self, model: str, text: str | bytes, block_chars: int, max_blocks: int, cache_salt: str = ""
    ) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        if len(data) < block_chars:
            return []
        end = min(len(data) // block_chars, max_blocks) * block_chars
        xxh64 = xxhash.xxh64_intdigest
        # cache_salt (vLLM's tenant isolation) goes into the seed, so salted blocks never match.
        prev = xxh64((model + cache_salt).encode())
        hashes: list[int] = []
        append = hashes.append
        for start in range(0, end, block_chars):
            prev = xxh64(data[start : start + block_chars] + prev.to_bytes(8, "little"))
            append(prev)
        return hashes


class PrefixIndex:
    """hash -> endpoints holding it, plus a per-endpoint LRU that bounds what each endpoint holds."""

    def __init__(self, default_capacity: int = DEFAULT_LRU_CAPACITY_PER_SERVER) -> None:
        if default_capacity <= 0:
            raise ValueError("LRU capacity per server must be positive")
        self.default_capacity = default_capacity
        self._holders: dict[int, set[str]] = {}
        self._lrus: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}

    def __len__(self) -> int:
        """Number of distinct block hashes held by any endpoint."""
        return len(self._holders)

    def entries(self) -> int:
        """Total (hash, endpoint) pairs: the indexer's size."""
        return sum(len(lru) for lru in self._lrus.values())

    def set_capacity(self, endpoint_key: str, capacity: int) -> None:
        """Per-endpoint capacity, e.g. the server's num_gpu_blocks. Shrinking evicts at once."""
        if capacity <= 0:
            return
        self._capacity[endpoint_key] = capacity
        lru = self._lrus.get(endpoint_key)
        if lru is not None:
            self._evict(endpoint_key, lru, capacity)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks matched per endpoint, walking the chain until a block no endpoint holds."""
        counts: dict[str, int] = {}
        holders_of = self._holders.get
        for h in hashes:
            holders = holders_of(h)
            if not holders:
                break
            for key in holders:
                counts[key] = counts.get(key, 0) + 1
        return counts

    def add(self, endpoint_key: str, hashes: Iterable[int]) -> list[int]:
        """Record that the endpoint now holds these blocks (most recent last). Returns the hashes
        it did not hold before (an empty list when none are new), e.g. to undo them later with
        `discard`."""
        lru = self._lrus.get(endpoint_key)
        if lru is None:
            lru = self._lrus[endpoint_key] = OrderedDict()
        holders = self._holders
        added: list[int] = []
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            added.append(h)
            owners = holders.get(h)
            if owners is None:
                holders[h] = {endpoint_key}
            else:
                owners.add(endpoint_key)
        if self._evict(endpoint_key, lru, self._capacity.get(endpoint_key, self.default_capacity)) and added:
            added = [h for h in added if h in lru]  # some aged out at once: not held after all
        return added

    def discard(self, endpoint_key: str, hashes: Iterable[int]) -> None:
        """Forget that the endpoint holds these blocks (those it does not hold are ignored)."""
        lru = self._lrus.get(endpoint_key)
        if lru is None:
            return
        holders = self._holders
        for h in hashes:
            if h in lru:
                del lru[h]
                self._drop_holder(h, endpoint_key, holders)

    def _evict(self, endpoint_key: str, lru: OrderedDict[int, None], capacity: int) -> bool:
        """Drop the oldest blocks beyond `capacity`; True when any were dropped."""
        if len(lru) <= capacity:
            return False
        holders = self._holders
        while len(lru) > capacity:
            h, _ = lru.popitem(last=False)
            self._drop_holder(h, endpoint_key, holders)
        return True

    @staticmethod
    def _drop_holder(h: int, endpoint_key: str, holders: dict[int, set[str]]) -> None:
        owners = holders.get(h)
        if owners is not None:
            owners.discard(endpoint_key)
            if not owners:
                del holders[h]

    def remove_endpoint(self, endpoint_key: str) -> None:
        """Purge everything an endpoint held (it left the pool)."""
        lru = self._lrus.pop(endpoint_key, None)
        self._capacity.pop(endpoint_key, None)
        if lru is None:
            return
        for h in lru:
            self._drop_holder(h, endpoint_key, self._holders)
