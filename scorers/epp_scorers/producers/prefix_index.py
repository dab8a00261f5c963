"""Approximate prefix-cache index: which endpoint has probably seen which prompt prefix.

Prompts are cut into fixed-size blocks of bytes and hashed in a chain (each block's hash covers
every byte before it), exactly as the Go EPP does, so two requests share a block hash only when
they share the whole prefix up to that block:

    seed = xxh64(model)            h_i = xxh64(block_i + h_{i-1} as 8 bytes little endian)

The index maps a block hash to the endpoints that hold it, and keeps one LRU per endpoint with a
bounded capacity (the model server's KV blocks, clamped), so old blocks age out; an absolute cap
on the whole index (entries and approximate bytes) bounds its memory whatever the pods report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import xxhash

CHARS_PER_TOKEN = 4
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
# The most blocks one endpoint may hold whatever it reports: 262,144 blocks of 64 tokens are 16.7M
# tokens of KV cache, beyond any single server today. A pod reporting num_gpu_blocks=1e9 gets this.
DEFAULT_MAX_CAPACITY_PER_SERVER = 262_144
# The whole index, over every endpoint: 1M entries are about 200 MB (see ENTRY_BYTES).
DEFAULT_MAX_INDEX_ENTRIES = 1_000_000
DEFAULT_MAX_INDEX_BYTES = 256 * 1024 * 1024
# Approximate memory, measured with tracemalloc (tests/plugins/test_prefix_index.py checks the
# estimate against it): each (hash, endpoint) entry costs its OrderedDict slot and node and its
# int; each distinct hash its slot in the holders dict; each holder of a hash beyond the first, its
# own int and the tuple of holders. Measured from 20k to 300k entries: 141-209 B an entry with one
# holder a hash, 154-205 with two (P/D: prefill and decode), 143-173 with four, depending on where
# the dicts are in their growth; the estimate (200, 195, 192) takes the high end. Before holders
# were kept out of sets: 357-425, 234-288, 173-212.
ENTRY_BYTES = 150
HASH_BYTES = 50
SHARED_BYTES = 40
# Why an index evicted: a full endpoint LRU, or the whole index's entry or byte cap.
REASON_CAPACITY = "capacity"
REASON_MAX_ENTRIES = "max_entries"
REASON_MAX_BYTES = "max_bytes"
_EMPTY: OrderedDict[int, None] = OrderedDict()


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
    """hash -> endpoints holding it, plus a per-endpoint LRU that bounds what each endpoint holds,
    under an absolute cap on the whole index (entries and approximate bytes).

    Bounds, each counted when it evicts (`on_evict(reason, count)`):
    - per endpoint, its capacity (`set_capacity`, e.g. from the server's num_gpu_blocks, clamped
      to `max_capacity`; else `default_capacity`): its oldest blocks go first (reason "capacity");
    - the whole index, `max_entries` (hash, endpoint) pairs and `max_bytes` of approximate memory
      (`approx_bytes`): the endpoint holding the most entries loses its oldest (reasons
      "max_entries" / "max_bytes"). Taking from the largest shares the cap evenly among the busy
      endpoints, so a pod that reports an absurd KV capacity cannot crowd out the others.

    Memory: the holders of a hash are one `str` (the usual case) or a tuple of them, not a set
    (a one-element set costs 216 bytes); see `ENTRY_BYTES`.
    """

    def __init__(
        self,
        default_capacity: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
        *,
        max_capacity: int = DEFAULT_MAX_CAPACITY_PER_SERVER,
        max_entries: int = DEFAULT_MAX_INDEX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_INDEX_BYTES,
        on_evict: Callable[[str, int], None] | None = None,
    ) -> None:
        if default_capacity <= 0 or max_capacity <= 0:
            raise ValueError("LRU capacity per server must be positive")
        if max_entries <= 0 or max_bytes <= 0:
            raise ValueError("the index's entry and byte limits must be positive")
        self.max_capacity = max_capacity
        self.default_capacity = min(default_capacity, max_capacity)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._holders: dict[int, str | tuple[str, ...]] = {}
        self._lrus: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self._entries = 0

    def __len__(self) -> int:
        """Number of distinct block hashes held by any endpoint."""
        return len(self._holders)

    def entries(self) -> int:
        """Total (hash, endpoint) pairs: the indexer's size."""
        return self._entries

    def approx_bytes(self) -> int:
        """The index's memory, estimated from its entries and distinct hashes (see ENTRY_BYTES)."""
        distinct = len(self._holders)
        return self._entries * ENTRY_BYTES + distinct * HASH_BYTES + (self._entries - distinct) * SHARED_BYTES

    def capacity(self, endpoint_key: str) -> int:
        """Blocks the endpoint may hold."""
        return self._capacity.get(endpoint_key, self.default_capacity)

    def set_capacity(self, endpoint_key: str, capacity: int) -> int:
        """Per-endpoint capacity, e.g. the server's num_gpu_blocks, clamped to `max_capacity`.
        Shrinking evicts at once. Returns the capacity in force (0 and below are ignored)."""
        if capacity <= 0:
            return self.capacity(endpoint_key)
        capacity = min(capacity, self.max_capacity)
        self._capacity[endpoint_key] = capacity
        lru = self._lrus.get(endpoint_key)
        if lru is not None and len(lru) > capacity:
            self._count(REASON_CAPACITY, self._pop_oldest(endpoint_key, lru, len(lru) - capacity))
        return capacity

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks matched per endpoint, walking the chain until a block no endpoint holds."""
        counts: dict[str, int] = {}
        holders_of = self._holders.get
        for h in hashes:
            holders = holders_of(h)
            if holders is None:
                break
            if type(holders) is str:
                counts[holders] = counts.get(holders, 0) + 1
            else:
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
                holders[h] = endpoint_key
            elif type(owners) is str:
                holders[h] = (owners, endpoint_key)
            else:
                holders[h] = (*owners, endpoint_key)
        self._entries += len(added)
        evicted = False
        capacity = self._capacity.get(endpoint_key, self.default_capacity)
        if len(lru) > capacity:
            self._count(REASON_CAPACITY, self._pop_oldest(endpoint_key, lru, len(lru) - capacity))
            evicted = True
        if self._entries > self.max_entries or self.approx_bytes() > self.max_bytes:
            self._enforce_limits()
            evicted = True
        if evicted and added:
            lru = self._lrus.get(endpoint_key, _EMPTY)
            added = [h for h in added if h in lru]  # some aged out at once: not held after all
        return added

    def discard(self, endpoint_key: str, hashes: Iterable[int]) -> None:
        """Forget that the endpoint holds these blocks (those it does not hold are ignored)."""
        lru = self._lrus.get(endpoint_key)
        if lru is None:
            return
        for h in hashes:
            if h in lru:
                del lru[h]
                self._entries -= 1
                self._drop_holder(h, endpoint_key)

    def remove_endpoint(self, endpoint_key: str) -> None:
        """Purge everything an endpoint held (it left the pool)."""
        lru = self._lrus.pop(endpoint_key, None)
        self._capacity.pop(endpoint_key, None)
        if lru is None:
            return
        self._entries -= len(lru)
        for h in lru:
            self._drop_holder(h, endpoint_key)

    def _enforce_limits(self) -> None:
        """Evict from the endpoint holding the most entries until the index is within its caps."""
        lrus = self._lrus
        while lrus:
            over_entries = self._entries - self.max_entries
            over_bytes = self.approx_bytes() - self.max_bytes
            if over_entries <= 0 and over_bytes <= 0:
                return
            reason = REASON_MAX_ENTRIES if over_entries > 0 else REASON_MAX_BYTES
            # Enough entries to clear both overshoots, or fewer (a sole holder's entry frees the
            # most, ENTRY_BYTES + HASH_BYTES) and another round.
            count = max(over_entries, -(-over_bytes // (ENTRY_BYTES + HASH_BYTES)))
            victim = max(lrus, key=lambda key: len(lrus[key]))
            lru = lrus[victim]
            self._count(reason, self._pop_oldest(victim, lru, min(count, len(lru))))
            if not lru:
                del lrus[victim]

    def _pop_oldest(self, endpoint_key: str, lru: OrderedDict[int, None], count: int) -> int:
        for _ in range(count):
            h, _ = lru.popitem(last=False)
            self._drop_holder(h, endpoint_key)
        self._entries -= count
        return count

    def _count(self, reason: str, count: int) -> None:
        if count and self.on_evict is not None:
            self.on_evict(reason, count)

    def _drop_holder(self, h: int, endpoint_key: str) -> None:
        holders = self._holders
        owners = holders.get(h)
        if owners is None:
            return
        if type(owners) is str:
            if owners == endpoint_key:
                del holders[h]
            return
        rest = tuple(key for key in owners if key != endpoint_key)
        holders[h] = rest[0] if len(rest) == 1 else rest
