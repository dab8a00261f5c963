"""Approximate prefix-cache index: which endpoint has probably seen which prompt prefix.

Prompts are cut into fixed-size blocks of bytes and hashed in a chain (each block's hash covers
every byte before it), as the Go EPP chains its block hashes, so two requests share a block hash
only when they share the whole prefix up to that block:

    h_0 = xxh64(model + cache_salt)            h_i = xxh64(block_i, seed=h_{i-1})

The Go EPP hashes `block_i + h_{i-1}` (and token ids rather than bytes); these hashes are epp's
own (never compared with the Go EPP's or an engine's), so the chain goes through xxh64's seed
instead: no concatenation per block, 1.5x faster (a documented difference, docs/migrating-from-go.md).

The index maps a block hash to the endpoints that hold it, and keeps one LRU per endpoint with a
bounded capacity (the model server's KV blocks, clamped), so old blocks age out; an absolute cap
on the whole index (entries and approximate bytes) bounds its memory whatever the pods report.

It is stored compactly, in flat arrays of machine integers rather than Python objects (see
`PrefixIndex`): about 85 bytes per (block, endpoint) entry, where dicts of ints took 140-210.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import xxhash

CHARS_PER_TOKEN = 4
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
# The most blocks one endpoint may hold whatever it reports: 262,144 blocks of 64 tokens are 16.7M
# tokens of KV cache, beyond any single server today. A pod reporting num_gpu_blocks=1e9 gets this.
DEFAULT_MAX_CAPACITY_PER_SERVER = 262_144
# The whole index, over every endpoint: 1M entries are counted as about 72 MB (see ENTRY_BYTES;
# about 85 MB in RSS).
DEFAULT_MAX_INDEX_ENTRIES = 1_000_000
DEFAULT_MAX_INDEX_BYTES = 256 * 1024 * 1024
# Approximate memory (tests/plugins/test_prefix_index.py checks the estimate against tracemalloc):
# each (hash, endpoint) entry is 36 bytes in the entry arrays, plus what they keep in reserve as
# they grow, and a 4-byte slot in the pair table, kept 25-50 % full (8-16 bytes); each distinct
# hash a 4-byte slot in the hash table, kept 12-25 % full (16-32 bytes). Measured: about 85
# bytes an entry in RSS at 100 pods x 31,250 blocks (`python -m epp_bench memory`).
ENTRY_BYTES = 52
HASH_BYTES = 20
SHARED_BYTES = 0  # a further holder of a hash costs an entry, nothing more
# Why an index evicted: a full endpoint LRU, or the whole index's entry or byte cap.
REASON_CAPACITY = "capacity"
REASON_MAX_ENTRIES = "max_entries"
REASON_MAX_BYTES = "max_bytes"

_NONE = -1  # no entry / an empty table slot
_MASK64 = (1 << 64) - 1
# A key's home slot in a table is its low bits (xxh64's output is uniform there, as Python's
# dict relies on for ints); a pair's key is the hash xor its endpoint's salt.
_MIN_TABLE_BITS = 10
_TABLE_PAD = 64  # slots past the end: probing never wraps around
# An endpoint's salt in the pair table: (its id + 1) x this, xor-ed into the hash.
_SALT = 0xC2B2AE3D27D4EB4F
_SCALAR_PROBES = 8  # probes in numpy while more than this many are left; the rest in Python
_VECTOR_MATCH = 96  # match() in numpy from this many hashes; plain Python below
_VECTOR_WALK = 8  # holders walked in numpy while more than this many lists are left
_SIG_SEED = 0x5BD1E995  # an endpoint id's signature key: xxh64 of the id under this seed


class PromptHasher:
    """Chained block hashes of a prompt.

    One call of xxhash's one-shot function per block, seeded with the previous block's hash: in
    Python the per-call overhead dominates, so a reused streaming hasher (reset/update/digest)
    measured 2x slower and hashing `block + previous hash as 8 bytes` 1.5x slower (the
    concatenation). The blocks are cut in one numpy call (a view of the bytes as fixed-size
    records, listed as `bytes`): 0.6x the time of slicing each in the loop, 390 blocks of 256.
    Nothing is allocated per request beyond the blocks and the result list.
    """

    __slots__ = ()

    def block_hashes(
        self, model: str, text: str | bytes, block_chars: int, max_blocks: int, cache_salt: str = ""
    ) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        if len(data) < block_chars:
            return []
        count = min(len(data) // block_chars, max_blocks)
        blocks: list[bytes] = np.frombuffer(data, dtype=f"V{block_chars}", count=count).tolist()
        xxh64 = xxhash.xxh64_intdigest
        # cache_salt (vLLM's tenant isolation) goes into the seed, so salted blocks never match.
        prev = xxh64((model + cache_salt).encode())
        hashes: list[int] = []
        append = hashes.append
        for block in blocks:
            prev = xxh64(block, prev)  # chained through the seed
            append(prev)
        return hashes


class _Table:
    """An open-addressing hash table of entry numbers (linear probing, no wrap-around: `_TABLE_PAD`
    spare slots at the end, the last always empty; no tombstones: a removal shifts its run back).
    It stores only the entry; what the entry is keyed by is the index's business (the home slot
    of an entry is given by the index's key function when the table is rebuilt)."""

    __slots__ = ("bits", "fill", "grow_at", "mask", "slots")

    def __init__(self, bits: int, fill: int) -> None:
        self.bits, self.fill = bits, fill
        self.mask = (1 << bits) - 1
        self.grow_at = (1 << bits) // fill
        self.slots = array("i", [_NONE]) * ((1 << bits) + _TABLE_PAD)

    @classmethod
    def built(
        cls, bits: int, fill: int, entries: np.ndarray, home_of: Callable[[np.ndarray, int], np.ndarray]
    ) -> _Table:
        """A table holding `entries`, whose home slots at `bits` bits `home_of` gives, built in
        numpy: sorted by home, each goes to max(its home, the previous one's slot + 1)."""
        while True:
            size = (1 << bits) + _TABLE_PAD
            slots = np.full(size, _NONE, dtype=np.int32)
            if len(entries):
                home = home_of(entries, bits).astype(np.int64)
                order = np.argsort(home, kind="stable")
                steps = np.arange(len(home), dtype=np.int64)
                where = np.maximum.accumulate(home[order] - steps) + steps
                if where[-1] >= size - 1:  # the last slot must stay empty
                    bits += 1
                    continue
                slots[where] = entries[order]
            table = cls.__new__(cls)
            table.bits, table.fill, table.mask = bits, fill, (1 << bits) - 1
            table.grow_at = (1 << bits) // fill
            table.slots = array("i", slots.tobytes())
            return table

    def live(self) -> np.ndarray:
        slots = np.frombuffer(self.slots, dtype=np.int32)
        entries: np.ndarray = slots[slots != _NONE].copy()
        return entries


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

    Storage, flat arrays of machine integers (no Python object per entry):
    - one entry per (hash, endpoint): the hash, the endpoint's small id, its neighbours in the
      endpoint's LRU list (oldest first) and in the list of the hash's holders, and, on a hash's
      first holder, the signature of its holders (see `match`); freed entries are reused;
    - two hash tables of entry numbers: by hash (the first holder: what `match` walks) and by
      (hash, endpoint) (whether an endpoint holds a hash: what `add` and `discard` ask), so no
      operation walks a long list of holders or a long LRU.
    `match` of a long prompt runs in numpy; the rest is plain Python on the arrays.
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
        self._capacity: dict[str, int] = {}
        # Endpoints: key <-> small id; per id its salt (for the pair table), its LRU list's ends
        # and its length.
        self._ids: dict[str, int] = {}
        self._keys: list[str] = []
        self._salts: list[int] = []
        self._free_ids: list[int] = []
        self._oldest: list[int] = []
        self._newest: list[int] = []
        self._held: list[int] = []
        # Entries.
        self._e_hash = array("Q")
        self._e_ep = array("i")
        self._e_prev = array("i")  # the endpoint's LRU list
        self._e_next = array("i")
        self._e_up = array("i")  # the hash's holders
        self._e_down = array("i")
        # For a hash's first holder: the xor of its holders' signature keys (see `match`).
        self._e_sig = array("Q")
        self._sig_keys: list[int] = []  # per endpoint id, a random 64-bit key
        self._free_entry = _NONE  # freed entries, chained through _e_next
        self._entries = 0
        self._distinct = 0
        # The by-hash table, which match() probes for every block of a prompt, is kept emptier
        # (at most a quarter full: shorter probes) than the by-pair one (at most half full).
        self._by_hash = _Table(_MIN_TABLE_BITS, 4)
        self._by_pair = _Table(_MIN_TABLE_BITS, 2)

    def __len__(self) -> int:
        """Number of distinct block hashes held by any endpoint."""
        return self._distinct

    def entries(self) -> int:
        """Total (hash, endpoint) pairs: the indexer's size."""
        return self._entries

    def held(self, endpoint_key: str) -> int:
        """Blocks the endpoint holds now."""
        eid = self._ids.get(endpoint_key)
        return 0 if eid is None else self._held[eid]

    def approx_bytes(self) -> int:
        """The index's memory, estimated from its entries and distinct hashes (see ENTRY_BYTES)."""
        return self._entries * ENTRY_BYTES + self._distinct * HASH_BYTES

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
        eid = self._ids.get(endpoint_key)
        if eid is not None and self._held[eid] > capacity:
            self._count(REASON_CAPACITY, self._pop_oldest(eid, self._held[eid] - capacity))
        return capacity

    # --- the two tables -----------------------------------------------------------------------------

    def _hash_slot(self, h: int) -> int:
        """The by-hash slot of `h`, or -(the empty slot where it would go) - 1."""
        table = self._by_hash
        i = h & table.mask
        slots, hashes = table.slots, self._e_hash
        while (entry := slots[i]) != _NONE:
            if hashes[entry] == h:
                return i
            i += 1
        return -i - 1

    def _pair_slot(self, h: int, eid: int) -> int:
        """The by-pair slot of (h, eid), or -(the empty slot where it would go) - 1."""
        table = self._by_pair
        i = (h ^ self._salts[eid]) & table.mask
        slots, hashes, ep = table.slots, self._e_hash, self._e_ep
        while (entry := slots[i]) != _NONE:
            if hashes[entry] == h and ep[entry] == eid:
                return i
            i += 1
        return -i - 1

    def _hash_homes(self, entries: np.ndarray, bits: int) -> np.ndarray:
        hashes = np.frombuffer(self._e_hash, dtype=np.uint64)[entries]
        homes: np.ndarray = hashes & np.uint64((1 << bits) - 1)
        return homes

    def _pair_homes(self, entries: np.ndarray, bits: int) -> np.ndarray:
        hashes = np.frombuffer(self._e_hash, dtype=np.uint64)[entries]
        salts = np.array(self._salts, dtype=np.uint64)[np.frombuffer(self._e_ep, dtype=np.int32)[entries]]
        homes: np.ndarray = (hashes ^ salts) & np.uint64((1 << bits) - 1)
        return homes

    def _insert(self, table: _Table, slot: int, entry: int, count: int) -> _Table:
        """Put `entry` in the empty `slot` a lookup returned; `count` is the table's fill after
        it. Returns the table (a new one when it had to grow)."""
        table.slots[slot] = entry
        if slot < len(table.slots) - 1 and count <= table.grow_at:
            return table
        bits = table.bits + (count > table.grow_at)
        homes = self._hash_homes if table is self._by_hash else self._pair_homes
        return _Table.built(bits, table.fill, table.live(), homes)

    def _remove_slot(self, table: _Table, i: int, pair: bool) -> None:
        """Empty slot i of a table, shifting back the rest of its run so no lookup stops short."""
        slots, hashes, ep, salts, mask = table.slots, self._e_hash, self._e_ep, self._salts, table.mask
        j = i + 1
        while (entry := slots[j]) != _NONE:
            key = (hashes[entry] ^ salts[ep[entry]]) if pair else hashes[entry]
            if key & mask <= i:
                slots[i] = entry
                i = j
            j += 1
        slots[i] = _NONE

    # --- entries ------------------------------------------------------------------------------------

    def _endpoint_id(self, endpoint_key: str) -> int:
        eid = self._ids.get(endpoint_key)
        if eid is None:
            if self._free_ids:
                eid = self._free_ids.pop()
                self._keys[eid] = endpoint_key
                self._oldest[eid] = self._newest[eid] = _NONE
                self._held[eid] = 0
            else:
                eid = len(self._keys)
                self._keys.append(endpoint_key)
                self._salts.append(((eid + 1) * _SALT) & _MASK64)
                self._oldest.append(_NONE)
                self._newest.append(_NONE)
                self._held.append(0)
                self._sig_keys.append(xxhash.xxh64_intdigest(eid.to_bytes(4, "little"), _SIG_SEED))
            self._ids[endpoint_key] = eid
        return eid

    def _new_entry(self, h: int, eid: int) -> int:
        """A new entry for (h, eid), newest in eid's LRU (not yet in the tables or holders)."""
        newest = self._newest[eid]
        entry = self._free_entry
        if entry != _NONE:
            self._free_entry = self._e_next[entry]
            self._e_hash[entry] = h
            self._e_ep[entry] = eid
            self._e_prev[entry] = newest
            self._e_next[entry] = _NONE
        else:
            entry = len(self._e_hash)
            self._e_hash.append(h)
            self._e_ep.append(eid)
            self._e_prev.append(newest)
            self._e_next.append(_NONE)
            self._e_up.append(_NONE)
            self._e_down.append(_NONE)
            self._e_sig.append(0)
        if newest == _NONE:
            self._oldest[eid] = entry
        else:
            self._e_next[newest] = entry
        self._newest[eid] = entry
        self._held[eid] += 1
        self._entries += 1
        return entry

    def _unlink(self, entry: int, eid: int) -> None:
        """Take `entry` out of its endpoint's LRU list."""
        prev, nxt = self._e_prev[entry], self._e_next[entry]
        if prev == _NONE:
            self._oldest[eid] = nxt
        else:
            self._e_next[prev] = nxt
        if nxt == _NONE:
            self._newest[eid] = prev
        else:
            self._e_prev[nxt] = prev

    def _drop(self, entry: int, eid: int) -> None:
        """Remove `entry` everywhere: its LRU list, the pair table, its hash's holders (and the
        hash, if it was the last), and put it on the free list."""
        h = self._e_hash[entry]
        self._unlink(entry, eid)
        self._remove_slot(self._by_pair, self._pair_slot(h, eid), pair=True)
        up, down = self._e_up[entry], self._e_down[entry]
        key = self._sig_keys[eid]
        if up == _NONE:  # the first holder: the by-hash table points at it
            slot = self._hash_slot(h)
            if down == _NONE:
                self._remove_slot(self._by_hash, slot, pair=False)
                self._distinct -= 1
            else:
                self._by_hash.slots[slot] = down
                self._e_up[down] = _NONE
                self._e_sig[down] = self._e_sig[entry] ^ key
        else:
            self._e_down[up] = down
            if down != _NONE:
                self._e_up[down] = up
            self._e_sig[self._by_hash.slots[self._hash_slot(h)]] ^= key
        self._e_next[entry] = self._free_entry
        self._free_entry = entry
        self._held[eid] -= 1
        self._entries -= 1

    # --- the index's operations ---------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks matched per endpoint, walking the chain until a block no endpoint holds.

        A prefix many endpoints hold (a system prompt every pod has seen) would cost a walk of
        all its holders for each of its blocks. Consecutive blocks usually have the same holders
        (a prompt's blocks are added together), so each hash's first holder carries the xor of
        its holders' random 64-bit keys: a run of blocks with the same signature is one set of
        holders (two different sets collide with probability 2**-64), walked once and credited
        with the run's length. O(blocks + holders x runs) rather than O(blocks x holders)."""
        if len(hashes) >= _VECTOR_MATCH:
            return self._match_vector(hashes)
        counts: dict[int, int] = {}
        table = self._by_hash
        slots, mask, stored, ep, down = table.slots, table.mask, self._e_hash, self._e_ep, self._e_down
        sigs = self._e_sig
        head, run, run_sig = _NONE, 0, -1  # the run's first holder, its length and signature
        for h in hashes:
            i = h & mask
            while (entry := slots[i]) != _NONE and stored[entry] != h:
                i += 1
            if entry == _NONE:
                break
            if sigs[entry] == run_sig:
                run += 1
                continue
            while head != _NONE:
                eid = ep[head]
                counts[eid] = counts.get(eid, 0) + run
                head = down[head]
            head, run, run_sig = entry, 1, sigs[entry]
        while head != _NONE:
            eid = ep[head]
            counts[eid] = counts.get(eid, 0) + run
            head = down[head]
        keys = self._keys
        return {keys[eid]: n for eid, n in counts.items()}

    def _probe(self, table: _Table, wanted: np.ndarray) -> np.ndarray:
        """Each wanted hash's entry in the by-hash table, up to the first hash the table does not
        hold: that ends the chain, and the result stops there. The probes run a step at a time
        for all hashes at once in numpy, cutting the result at the first hash proved absent (an
        empty slot) after each step; the last few in Python."""
        slots = np.frombuffer(table.slots, dtype=np.int32)
        stored = np.frombuffer(self._e_hash, dtype=np.uint64)
        where = (wanted & np.uint64(table.mask)).astype(np.intp)
        # The first probe, of every hash at its home slot, on whole arrays (most are found there).
        found = slots[where]
        empty = found == _NONE
        end = int(empty.argmax()) if empty.any() else len(wanted)  # absent: the chain ends there
        found, wanted, where = found[:end], wanted[:end], where[:end]
        hit = stored[found] == wanted  # no empty slot is left among them
        if hit.all():
            return found
        pending = np.flatnonzero(~hit)  # another key's slot: probe on
        found[pending] = _NONE
        where[pending] += 1
        while len(pending) > _SCALAR_PROBES:
            entry = slots[where[pending]]
            empty = entry == _NONE
            if empty.any():  # absent: the chain ends there at the latest
                first = int(pending[empty.argmax()])
                end = first
                keep = pending < first
                pending, entry = pending[keep], entry[keep]
            hit = stored[entry] == wanted[pending]  # no empty slot is left among them
            found[pending[hit]] = entry[hit]
            pending = pending[~hit]  # another key's slot: probe on
            where[pending] += 1
        del slots, stored
        for i in pending.tolist():  # in order: the first one absent ends the chain
            slot = self._hash_slot(int(wanted[i]))
            if slot < 0:
                return found[:i]
            found[i] = table.slots[slot]
        return found[:end]

    def _match_vector(self, hashes: Sequence[int]) -> dict[str, int]:
        """match() in numpy: every hash probed at once, then each run's holders walked once, a
        step at a time."""
        if not self._entries:
            return {}
        wanted = np.fromiter(hashes, dtype=np.uint64, count=len(hashes))
        entries = self._probe(self._by_hash, wanted)
        if not len(entries):
            return {}
        # Runs of blocks with the same holders (match's docstring): each run's first holder list
        # is walked once, credited with the run's length.
        sigs = np.frombuffer(self._e_sig, dtype=np.uint64)[entries]
        starts = np.flatnonzero(np.concatenate(([True], sigs[1:] != sigs[:-1])))
        runs = np.diff(np.append(starts, len(entries)))
        entries = entries[starts]
        ep = np.frombuffer(self._e_ep, dtype=np.int32)
        down = np.frombuffer(self._e_down, dtype=np.int32)
        per_step, per_step_runs = [], []
        while len(entries) > _VECTOR_WALK:
            per_step.append(ep[entries])
            per_step_runs.append(runs)
            entries = down[entries]
            going = entries != _NONE
            entries, runs = entries[going], runs[going]
        counts: dict[int, int] = {}
        if per_step:
            totals = np.bincount(np.concatenate(per_step), weights=np.concatenate(per_step_runs))
            held = np.flatnonzero(totals)
            counts = dict(zip(held.tolist(), totals[held].astype(np.int64).tolist(), strict=True))
        del ep, down, sigs
        e_ep, e_down = self._e_ep, self._e_down
        for entry, run in zip(entries.tolist(), runs.tolist(), strict=True):
            while entry != _NONE:
                eid = e_ep[entry]
                counts[eid] = counts.get(eid, 0) + run
                entry = e_down[entry]
        names = self._keys
        return {names[eid]: n for eid, n in counts.items()}

    def add(self, endpoint_key: str, hashes: Iterable[int]) -> list[int]:
        """Record that the endpoint now holds these blocks (most recent last). Returns the hashes
        it did not hold before (an empty list when none are new), e.g. to undo them later with
        `discard`.

        A prompt's blocks usually sit together, in order, in the endpoint's LRU list (an earlier
        request with the same prefix put them there): a run of them is followed along the list,
        one comparison a block, and moved to the newest end at once."""
        eid = self._endpoint_id(endpoint_key)
        hashes = hashes if isinstance(hashes, Sequence) else list(hashes)
        added: list[int] = []
        e_hash, e_prev, e_next = self._e_hash, self._e_prev, self._e_next
        e_up, e_down, e_sig, sig_key = self._e_up, self._e_down, self._e_sig, self._sig_keys[eid]
        count, i = len(hashes), 0
        while i < count:
            h = hashes[i]
            slot = self._pair_slot(h, eid)
            if slot >= 0:  # held: follow the run along the LRU list, then make it the newest
                first = last = self._by_pair.slots[slot]
                i += 1
                while i < count and (after := e_next[last]) != _NONE and e_hash[after] == hashes[i]:
                    last = after
                    i += 1
                newest = self._newest[eid]
                if last != newest:
                    before, after = e_prev[first], e_next[last]
                    if before == _NONE:
                        self._oldest[eid] = after
                    else:
                        e_next[before] = after
                    e_prev[after] = before
                    e_prev[first] = newest
                    e_next[newest] = first
                    e_next[last] = _NONE
                    self._newest[eid] = last
                continue
            i += 1
            entry = self._new_entry(h, eid)
            self._by_pair = self._insert(self._by_pair, -slot - 1, entry, self._entries)
            slot = self._hash_slot(h)
            if slot >= 0:  # other holders: this one goes first
                first = self._by_hash.slots[slot]
                e_up[first] = entry
                e_down[entry] = first
                e_up[entry] = _NONE
                e_sig[entry] = e_sig[first] ^ sig_key
                self._by_hash.slots[slot] = entry
            else:
                e_up[entry] = e_down[entry] = _NONE
                e_sig[entry] = sig_key
                self._distinct += 1
                self._by_hash = self._insert(self._by_hash, -slot - 1, entry, self._distinct)
            added.append(h)
        evicted = False
        capacity = self._capacity.get(endpoint_key, self.default_capacity)
        if self._held[eid] > capacity:
            self._count(REASON_CAPACITY, self._pop_oldest(eid, self._held[eid] - capacity))
            evicted = True
        if self._entries > self.max_entries or self.approx_bytes() > self.max_bytes:
            self._enforce_limits()
            evicted = True
        if evicted and added:
            added = [h for h in added if self._pair_slot(h, eid) >= 0]  # some aged out at once
        return added

    def discard(self, endpoint_key: str, hashes: Iterable[int]) -> None:
        """Forget that the endpoint holds these blocks (those it does not hold are ignored)."""
        eid = self._ids.get(endpoint_key)
        if eid is None:
            return
        for h in hashes:
            slot = self._pair_slot(h, eid)
            if slot >= 0:
                self._drop(self._by_pair.slots[slot], eid)

    def remove_endpoint(self, endpoint_key: str) -> None:
        """Purge everything an endpoint held (it left the pool)."""
        self._capacity.pop(endpoint_key, None)
        eid = self._ids.pop(endpoint_key, None)
        if eid is None:
            return
        self._pop_oldest(eid, self._held[eid])
        self._free_ids.append(eid)

    def _enforce_limits(self) -> None:
        """Evict from the endpoint holding the most entries until the index is within its caps."""
        held = self._held
        while self._entries:
            over_entries = self._entries - self.max_entries
            over_bytes = self.approx_bytes() - self.max_bytes
            if over_entries <= 0 and over_bytes <= 0:
                return
            reason = REASON_MAX_ENTRIES if over_entries > 0 else REASON_MAX_BYTES
            # Enough entries to clear both overshoots, or fewer (a sole holder's entry frees the
            # most, ENTRY_BYTES + HASH_BYTES) and another round.
            count = max(over_entries, -(-over_bytes // (ENTRY_BYTES + HASH_BYTES)))
            victim = max(self._ids.values(), key=held.__getitem__)
            self._count(reason, self._pop_oldest(victim, min(count, held[victim])))

    def _pop_oldest(self, eid: int, count: int) -> int:
        for _ in range(count):
            self._drop(self._oldest[eid], eid)
        return count

    def _count(self, reason: str, count: int) -> None:
        if count and self.on_evict is not None:
            self.on_evict(reason, count)
