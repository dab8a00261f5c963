"""A paged KV cache with prefix reuse, counted the way vLLM v1 counts it.

Blocks are either free, cached-and-referenced (a running request uses them), cached-and-unreferenced
(kept for later prefix hits, evictable in LRU order), or anonymous (referenced, but holding a partial
block or a duplicate, so never reusable). Usage = referenced blocks / total, as
`vllm:kv_cache_usage_perc` reports it: cached blocks nobody references count as free.

No per-block objects: a cached block is just its chain hash with a reference count, which keeps
admission O(prompt blocks) and the memory small. A block's key is an int (the simulator's own chain
hash) or bytes (vLLM's block hash of token ids, when the engine publishes KV events).

With `journal=True` the cache notes what the KV events report: `stored` (positions, in the hashes
of the last allocate / release call, of blocks it newly cached) and `removed` (keys evicted or
dropped since the engine last emptied the list).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockKey = int | bytes


@dataclass(slots=True)
class Allocation:
    """What one running request holds: cached blocks by hash (in chain order) and anonymous ones."""

    hashes: list[BlockKey] = field(default_factory=list)
    anonymous: int = 0


class KVCache:
    def __init__(self, num_blocks: int, journal: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.evictions = 0
        self._free = num_blocks  # blocks holding nothing reusable
        self._refs: dict[BlockKey, int] = {}  # cached block hash -> running requests referencing it
        self._lru: OrderedDict[BlockKey, None] = OrderedDict()  # cached with refs == 0, oldest first
        self.journal = journal
        self.stored: list[int] = []
        self.removed: list[BlockKey] = []

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self._free - len(self._lru)

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    def __contains__(self, block_hash: BlockKey) -> bool:
        return block_hash in self._refs

    def match(self, hashes: Sequence[BlockKey], max_blocks: int) -> int:
        """Length of the leading run of `hashes` already cached (at most `max_blocks`)."""
        n = 0
        limit = min(len(hashes), max_blocks)
        refs = self._refs
        while n < limit and hashes[n] in refs:
            n += 1
        return n

    def can_allocate(self, hashes: Sequence[BlockKey], hit_blocks: int, total_blocks: int) -> bool:
        # Hit blocks sitting in the LRU stop being evictable once referenced, so they don't count
        # as room for the new blocks.
        idle_hits = sum(1 for h in hashes[:hit_blocks] if self._refs[h] == 0)
        return total_blocks - hit_blocks <= self._free + len(self._lru) - idle_hits

    def allocate(self, hashes: Sequence[BlockKey], hit_blocks: int, total_blocks: int) -> Allocation | None:
        """Reference the first `hit_blocks` of `hashes`, take `total_blocks - hit_blocks` more (free ones
        first, then evicting LRU), and register the rest of `hashes` as cached. None if it won't fit."""
        if not self.can_allocate(hashes, hit_blocks, total_blocks):
            return None
        refs, lru = self._refs, self._lru
        held: list[BlockKey] = []
        for h in hashes[:hit_blocks]:  # reference hits first so the eviction below can't take them
            if refs[h] == 0:
                del lru[h]
            refs[h] += 1
            held.append(h)
        self._take(total_blocks - hit_blocks)
        stored = self.stored
        stored.clear()
        for i in range(hit_blocks, min(total_blocks, len(hashes))):
            h = hashes[i]
            if h in refs:  # cached further down the chain but not as a prefix: a recomputed duplicate
                continue
            refs[h] = 1
            held.append(h)
            if self.journal:
                stored.append(i)
        return Allocation(held, total_blocks - len(held))

    def release(self, alloc: Allocation, completed_hashes: Sequence[BlockKey] = ()) -> None:
        """Unreference a request's blocks. `completed_hashes` name anonymous blocks that filled up
        during generation: they become cached too (vLLM caches generated tokens' full blocks).
        Blocks are released deepest first, so the LRU evicts a prefix's tail before its head."""
        refs, lru = self._refs, self._lru
        anonymous = alloc.anonymous
        stored = self.stored
        stored.clear()
        for i in range(len(completed_hashes) - 1, -1, -1):
            if anonymous == 0:
                break
            h = completed_hashes[i]
            if h not in refs:
                refs[h] = 0
                lru[h] = None
                anonymous -= 1
                if self.journal:
                    stored.append(i)
        stored.reverse()
        for h in reversed(alloc.hashes):
            count = refs[h] - 1
            refs[h] = count
            if count == 0:
                lru[h] = None
        self._free += anonymous
        alloc.hashes = []
        alloc.anonymous = 0

    def reset(self) -> int:
        """Drop every unreferenced cached block (vLLM's /reset_prefix_cache). Returns how many."""
        dropped = len(self._lru)
        for h in self._lru:
            del self._refs[h]
        if self.journal:
            self.removed.extend(self._lru)
        self._lru.clear()
        self._free += dropped
        return dropped

    def _take(self, n: int) -> None:
        from_free = min(n, self._free)
        self._free -= from_free
        refs, lru = self._refs, self._lru
        for _ in range(n - from_free):
            victim, _ = lru.popitem(last=False)
            del refs[victim]
            self.evictions += 1
            if self.journal:
                self.removed.append(victim)
