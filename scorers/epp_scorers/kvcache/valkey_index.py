"""The shared block index: Valkey (or Redis), for epp replicas that each receive only some
engines' events (engines publishing to one replica's bound socket) and for a replica that starts
warm.

Every replica keeps the whole index in memory (`MemoryBlockIndex`, same bounds), so a lookup on
the request path never waits for the network. What a replica learns from its own subscribers it
applies locally at once and writes to Valkey from a background task:

- the state, one hash per block key `<prefix>:b:<key>` (field = pod, value = "<generation>|<tier>",
  expiring `ttl` seconds after the block was last stored), and per pod its generation
  `<prefix>:gen:<pod>` (INCR on AllBlocksCleared, a restarted engine, a pod removed);
- a change feed, the stream `<prefix>:feed` (bounded: MAXLEN ~ `feed_length`), one entry per
  add / remove / clear with the writer's replica id, and one per speculative entry
  (`speculativeIndexing`: the blocks of a request this replica just routed, credited to its pod
  until the engine's events confirm them or the guess expires), with the time it has left, so
  that the other replicas send the same prefix to the same pod before the events arrive. Guesses
  are not part of the state: a replica starting later does not load them.

Every replica reads the feed (XREAD) and applies the other replicas' entries to its memory index;
at start it loads the state first (SCAN + pipelined HGETALL, entries of a pod's current generation
only, up to the memory capacity), then follows the feed from where the load began, so nothing in
between is lost. Writes wait in a bounded queue (`max_pending` operations; the oldest are
dropped, and counted, when Valkey is slower than the events). Valkey unreachable: lookups go on
from memory, the writer and reader retry under the supervisor; the batch a failed write had taken
goes back to the head of the queue (replaying it is harmless: each operation sets a state), and a
restarted reader follows the feed on from the last entry it applied, so the other replicas'
removes and clears of the outage arrive too. Only when the feed was trimmed past that entry
(more than `feed_length` entries in the outage) does it load the state again, and counts a gap.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from epp_scorers.kvcache.index import DEFAULT_CAPACITY, DEFAULT_PODS_PER_KEY, MAX_PODS, MemoryBlockIndex

# valkey is imported when the index connects (see epp_scorers.kvcache.tokenize on why).
if TYPE_CHECKING:
    import valkey.asyncio as valkey_asyncio

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "epp:kv"
DEFAULT_TTL_S: Final = 3600
DEFAULT_FEED_LENGTH: Final = 100_000
DEFAULT_MAX_PENDING: Final = 100_000
_SCAN_BATCH: Final = 1000
_FEED_BLOCK_MS: Final = 1000
_FEED_BATCH: Final = 500
# A guess from another replica living longer than this is not applied (upstream's TTL is 2 s).
_MAX_GUESS_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class _Op:
    kind: str  # "add" | "remove" | "clear" | "guess"
    pod: str
    keys: tuple[int, ...] = ()
    tier: str = ""
    expires: float = 0.0  # a guess's end (time.monotonic())


def _raise_if_cancelled() -> None:
    """valkey-py can swallow a cancellation that lands while it opens a connection (the command
    then runs on, and the loop around it would never end): a loop that calls it checks for one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") in its order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _pack(keys: Sequence[int]) -> bytes:
    return struct.pack(f">{len(keys)}Q", *keys)


def _unpack(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(data) // 8}Q", data)


class ValkeyBlockIndex:
    """A `BlockIndex` whose contents are shared through Valkey (see the module docstring)."""

    def __init__(
        self,
        address: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        pods_per_key: int = DEFAULT_PODS_PER_KEY,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: int = DEFAULT_TTL_S,
        feed_length: int = DEFAULT_FEED_LENGTH,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.address = address
        self.memory = MemoryBlockIndex(capacity, pods_per_key)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.feed_length = feed_length
        self.replica = uuid.uuid4().hex[:12]
        self._pending: deque[_Op] = deque(maxlen=max_pending)
        self._wake = asyncio.Event()
        self.dropped = 0  # writes dropped because the queue was full
        self.loaded = 0  # block entries loaded at start
        self.applied = 0  # feed entries of other replicas applied
        self.written = 0  # operations written to Valkey
        self.feed_gaps = 0  # restarts that found the feed trimmed past the last entry applied
        self._feed_position: str | None = None  # the last feed entry applied (a restart goes on from it)
        self._write_generations: dict[str, int] = {}
        self.ready = asyncio.Event()  # set once the warm start is done
        self._client: valkey_asyncio.Valkey | None = None

    # --- BlockIndex (the local side, synchronous) ------------------------------------------------

    def __len__(self) -> int:
        return len(self.memory)

    def add(self, pod: str, keys: Sequence[int], tier: str) -> None:
        self.memory.add(pod, keys, tier)
        self._queue(_Op("add", pod, tuple(keys), tier))

    def remove(self, pod: str, keys: Sequence[int], tier: str) -> None:
        self.memory.remove(pod, keys, tier)
        self._queue(_Op("remove", pod, tuple(keys), tier))

    def clear_pod(self, pod: str) -> None:
        self.memory.clear_pod(pod)
        self._queue(_Op("clear", pod))

    def add_speculative(self, pod: str, keys: Sequence[int], expires: float) -> None:
        self.memory.add_speculative(pod, keys, expires)
        self._queue(_Op("guess", pod, tuple(keys), expires=expires))

    def match(self, keys: Sequence[int], pods: Mapping[str, Sequence[str]]) -> dict[str, int]:
        return self.memory.match(keys, pods)

    def first_holders(self, key: int) -> Collection[str]:
        return self.memory.first_holders(key)

    def _queue(self, op: _Op) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(op)
        self._wake.set()

    def _requeue(self, ops: list[_Op]) -> None:
        """A batch whose write failed goes back in front of the newer writes (the oldest of it
        dropped, and counted, if the queue filled meanwhile)."""
        room = (self._pending.maxlen or 0) - len(self._pending)
        keep = ops[max(len(ops) - room, 0) :]
        self.dropped += len(ops) - len(keep)
        self._pending.extendleft(reversed(keep))
        self._wake.set()

    # --- Valkey (background) -----------------------------------------------------------------------

    def _connect(self) -> valkey_asyncio.Valkey:
        if self._client is None:
            import valkey.asyncio as valkey_asyncio

            url = self.address if "://" in self.address else f"redis://{self.address}"
            self._client = valkey_asyncio.Valkey.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return self._client

    async def run(self) -> None:
        """Load the shared state, then write this replica's changes and apply the others'."""
        client = self._connect()
        try:
            start = await self._resume_point(client)
            self.ready.set()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._write_forever(client))
                group.create_task(self._follow_feed(client, start))
        finally:  # stopped or failed: the connections go (a restart opens new ones)
            await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _resume_point(self, client: valkey_asyncio.Valkey) -> str:
        """The feed entry to follow on from: the last one applied, after a restart while the feed
        still holds what came after it; else (the first start, or a trimmed feed) a warm start's."""
        position = self._feed_position
        if position is None:
            self._feed_position = await self._warm_start(client)
            return self._feed_position
        oldest = await client.xrange(f"{self.prefix}:feed", count=1)
        if not oldest or _stream_id(oldest[0][0].decode()) <= _stream_id(position):
            return position
        self.feed_gaps += 1
        log.warning(
            "KV index: the shared feed at %s was trimmed past this replica's last entry: "
            "loading the state again",
            self.address,
        )
        self._feed_position = await self._warm_start(client)
        return self._feed_position

    async def _warm_start(self, client: valkey_asyncio.Valkey) -> str:
        last = await client.xrevrange(f"{self.prefix}:feed", count=1)
        start = last[0][0].decode() if last else "0-0"
        generations: dict[str, int] = {}
        async for name in client.scan_iter(match=f"{self.prefix}:gen:*", count=_SCAN_BATCH):
            value = await client.get(name)
            generations[name.decode()[len(self.prefix) + 5 :]] = int(value or 0)
        batch: list[bytes] = []
        async for name in client.scan_iter(match=f"{self.prefix}:b:*", count=_SCAN_BATCH):
            batch.append(name)
            if len(batch) >= _SCAN_BATCH:
                await self._load(client, batch, generations)
                batch = []
                if len(self.memory) >= self.memory.capacity:
                    break
        if batch:
            await self._load(client, batch, generations)
        log.info("KV index: %d block entries loaded from %s", self.loaded, self.address)
        return start

    async def _load(self, client: valkey_asyncio.Valkey, names: list[bytes], gens: Mapping[str, int]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name.decode())
            holders = await pipe.execute()
        cut = len(self.prefix) + 3
        for name, fields in zip(names, holders, strict=True):
            key = int(name.decode()[cut:])
            for pod_raw, value in fields.items():
                generation, _, tier = value.decode().partition("|")
                pod = pod_raw.decode()
                if int(generation) == gens.get(pod, 0):
                    self.memory.add(pod, (key,), tier)
                    self.loaded += 1

    async def _write_forever(self, client: valkey_asyncio.Valkey) -> None:
        # A cache of Valkey's per-pod counters, new each run: bounded, a dropped pod's read again.
        generations = self._write_generations = {}
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                ops = [self._pending.popleft() for _ in range(min(len(self._pending), _FEED_BATCH))]
                try:
                    await self._write(client, ops, generations)
                except BaseException:
                    self._requeue(ops)
                    raise
                _raise_if_cancelled()

    async def _write(
        self, client: valkey_asyncio.Valkey, ops: list[_Op], generations: dict[str, int]
    ) -> None:
        # A pod's generation, for the state its adds write (a guess writes only to the feed).
        for pod in {op.pod for op in ops if op.kind != "guess" and op.pod not in generations}:
            generations[pod] = int(await client.get(f"{self.prefix}:gen:{pod}") or 0)
        async with client.pipeline(transaction=False) as pipe:
            for op in ops:
                fields: dict[Any, Any] = {
                    "op": op.kind,
                    "pod": op.pod,
                    "keys": _pack(op.keys),
                    "src": self.replica,
                }
                if op.kind == "guess":
                    left = op.expires - time.monotonic()  # the clocks of replicas differ: send what is left
                    if left > 0:
                        fields["ttl"] = f"{left:.3f}"
                        pipe.xadd(f"{self.prefix}:feed", fields, maxlen=self.feed_length, approximate=True)
                    continue
                if op.kind == "clear":
                    generations[op.pod] = generations.get(op.pod, 0) + 1
                    pipe.incr(f"{self.prefix}:gen:{op.pod}")
                else:
                    for key in op.keys:
                        name = f"{self.prefix}:b:{key}"
                        if op.kind == "add":
                            pipe.hset(name, op.pod, f"{generations[op.pod]}|{op.tier}")
                            pipe.expire(name, self.ttl_s)
                        else:
                            pipe.hdel(name, op.pod)
                fields["tier"] = op.tier
                pipe.xadd(f"{self.prefix}:feed", fields, maxlen=self.feed_length, approximate=True)
            await pipe.execute()
        self.written += len(ops)
        while len(generations) > MAX_PODS:  # departed pods (and made-up names) leave the cache
            del generations[next(iter(generations))]

    async def _follow_feed(self, client: valkey_asyncio.Valkey, start: str) -> None:
        last = start
        stream = f"{self.prefix}:feed"
        while True:
            reply = await client.xread({stream: last}, count=_FEED_BATCH, block=_FEED_BLOCK_MS)
            _raise_if_cancelled()
            for _name, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    self._apply_remote(fields)
                    self._feed_position = last

    def _apply_remote(self, fields: Mapping[bytes, bytes]) -> None:
        if fields.get(b"src", b"").decode() == self.replica:
            return  # our own write: applied already
        op = fields.get(b"op", b"").decode()
        pod = fields.get(b"pod", b"").decode()
        tier = fields.get(b"tier", b"").decode()
        if op == "add":
            self.memory.add(pod, _unpack(fields.get(b"keys", b"")), tier)
        elif op == "remove":
            self.memory.remove(pod, _unpack(fields.get(b"keys", b"")), tier)
        elif op == "clear":
            self.memory.clear_pod(pod)
        elif op == "guess":
            try:
                left = float(fields.get(b"ttl", b""))
            except ValueError:
                return
            if not 0 < left <= _MAX_GUESS_S:
                return
            self.memory.add_speculative(pod, _unpack(fields.get(b"keys", b"")), time.monotonic() + left)
        else:
            return
        self.applied += 1
