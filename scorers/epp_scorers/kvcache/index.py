"""The block index: block key -> the pods holding that block (and on which device tier).

`BlockIndex` is what the event consumers write and the scorers read; `MemoryBlockIndex` is the
in-process backend, `valkey_index.ValkeyBlockIndex` the shared one. Pods are named as the events
name them (the `<pod>` of the topic `kv@<pod>@<model>`, or the endpoint a subscriber connected
to); `match` takes, for each candidate, the names it may appear under (its IP and its ip:port).
Only a pod holding a prompt's first block can hold a run of its blocks, so a caller asks
`first_holders` first and hands `match` only the candidates named there (at most `pods_per_key`
and the predicted ones), not every endpoint of the pool.

Bounds (memory backend): at most `capacity` block keys (least recently stored evicted first) and
at most `pods_per_key` pods per key (the oldest dropped). A lookup costs O(blocks of the request)
dictionary reads. Clearing a pod (AllBlocksCleared, a restarted engine, a pod removed) is O(1): the
pod's generation moves on and its older entries stop counting, to be evicted in time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Final, Protocol

DEFAULT_CAPACITY: Final = 1_000_000  # block keys; about 400 bytes each with one pod (kv-events.md)
DEFAULT_PODS_PER_KEY: Final = 10  # llm-d's podCacheSize default
DEFAULT_SPECULATIVE_CAPACITY: Final = 100_000  # speculative block keys (each lives a TTL, 2 s by default)
# Pods named by events (each has a generation): past this many, the first one named is forgotten
# and its entries stop counting. Pods come and go; their names would otherwise pile up for ever.
MAX_PODS: Final = 100_000
_NOBODY: Final[dict[str, tuple[int, float]]] = {}
_NO_HOLDERS: Final[dict[str, tuple[int, str]]] = {}


class BlockIndex(Protocol):
    """The writes event consumers make and the read a scorer makes (synchronous, no I/O)."""

    def add(self, pod: str, keys: Sequence[int], tier: str) -> None: ...

    def remove(self, pod: str, keys: Sequence[int], tier: str) -> None: ...

    def clear_pod(self, pod: str) -> None: ...

    def add_speculative(self, pod: str, keys: Sequence[int], expires: float) -> None:
        """Blocks `pod` is about to store (a request was just routed there): they count as held
        until `expires` (time.monotonic()), unless the pod is cleared or removes them first."""
        ...

    def match(self, keys: Sequence[int], pods: Mapping[str, Sequence[str]]) -> dict[str, int]:
        """For each candidate (id -> the pod names it may appear under), how many of `keys`, from
        the first on, it holds in a row (candidates holding none are absent)."""
        ...

    def first_holders(self, key: int) -> Collection[str]:
        """The names under which some pod holds `key` or is predicted to (a superset: a stale
        entry may be among them); `match` credits no one else with the block."""
        ...

    def __len__(self) -> int: ...


class MemoryBlockIndex:
    """In-process, bounded block index (see the module docstring)."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        pods_per_key: int = DEFAULT_PODS_PER_KEY,
        speculative_capacity: int = DEFAULT_SPECULATIVE_CAPACITY,
    ) -> None:
        if capacity <= 0 or pods_per_key <= 0:
            raise ValueError("index capacity and pods per key must be positive")
        self.capacity = capacity
        self.pods_per_key = pods_per_key
        self.speculative_capacity = speculative_capacity
        # key -> {pod: (generation, expiry)}: predicted blocks, oldest first
        self._speculative: OrderedDict[int, dict[str, tuple[int, float]]] = OrderedDict()
        # key -> {pod: (generation, tier)}, least recently stored first
        self._blocks: OrderedDict[int, dict[str, tuple[int, str]]] = OrderedDict()
        self._generation: dict[str, int] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, pod: str, keys: Sequence[int], tier: str) -> None:
        generation = self._generation_of(pod)
        blocks = self._blocks
        for key in keys:
            holders = blocks.get(key)
            if holders is None:
                holders = blocks[key] = {}
            else:
                blocks.move_to_end(key)
                holders.pop(pod, None)  # re-inserted last: the newest holder
            holders[pod] = (generation, tier)
            if len(holders) > self.pods_per_key:
                del holders[next(iter(holders))]
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
            self.evictions += 1

    def add_speculative(self, pod: str, keys: Sequence[int], expires: float) -> None:
        generation = self._generation_of(pod)
        speculative = self._speculative
        for key in keys:
            pods = speculative.get(key)
            if pods is None:
                pods = speculative[key] = {}
            else:
                speculative.move_to_end(key)
            pods[pod] = (generation, expires)
        while len(speculative) > self.speculative_capacity:
            speculative.popitem(last=False)

    def remove(self, pod: str, keys: Sequence[int], tier: str) -> None:
        blocks = self._blocks
        speculative = self._speculative
        for key in keys:
            predicted = speculative.get(key)
            if predicted is not None:
                predicted.pop(pod, None)
            holders = blocks.get(key)
            if holders is None:
                continue
            held = holders.get(pod)
            if held is not None and held[1] == tier:
                del holders[pod]
                if not holders:
                    del blocks[key]

    def _generation_of(self, pod: str) -> int:
        generation = self._generation.get(pod)
        if generation is None:
            generation = self._generation[pod] = 0
            if len(self._generation) > MAX_PODS:
                del self._generation[next(iter(self._generation))]
        return generation

    def clear_pod(self, pod: str) -> None:
        if pod in self._generation:
            self._generation[pod] += 1

    def forget_pod(self, pod: str) -> None:
        """The pod left for good: its entries stop counting (same as clear_pod)."""
        self.clear_pod(pod)

    def first_holders(self, key: int) -> Collection[str]:
        held, predicted = self._blocks.get(key), self._speculative.get(key)
        if not predicted:
            return held.keys() if held else ()
        return predicted.keys() | held.keys() if held else predicted.keys()

    def match(self, keys: Sequence[int], pods: Mapping[str, Sequence[str]]) -> dict[str, int]:
        generation = self._generation
        blocks, speculative = self._blocks, self._speculative
        # The holders of each leading key (confirmed, predicted), up to the first key nobody holds.
        rows: list[tuple[Mapping[str, tuple[int, str]], Mapping[str, tuple[int, float]]]] = []
        for key in keys:
            holders = blocks.get(key)
            predicted = speculative.get(key) if speculative else None
            if holders is None and not predicted:
                break
            rows.append((holders or _NO_HOLDERS, predicted or _NOBODY))
        matched: dict[str, int] = {}
        if not rows:
            return matched
        now = time.monotonic()
        for candidate, names in pods.items():
            current = [(name, generation.get(name)) for name in names]
            depth = 0
            for row_held, row_predicted in rows:
                for name, gen in current:
                    held = row_held.get(name)
                    if held is not None and held[0] == gen:
                        break
                    guess = row_predicted.get(name)
                    if guess is not None and guess[0] == gen and guess[1] > now:
                        break
                else:
                    break  # no name of this candidate holds the block: its run ends
                depth += 1
            if depth:
                matched[candidate] = depth
        return matched
