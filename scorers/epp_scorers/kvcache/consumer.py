"""Applies KV-event batches to a block index, in order per source, with vLLM's sequence numbers.

Per source (one engine's publisher), batches carry sequence numbers 0, 1, 2, ... :

- the next number: applied;
- a jump forward (batches lost: the ZMQ high-water mark, a reconnect): the missing batches are
  fetched from the engine's replay socket when one is known (`replay`), then this one is
  applied; without replay, or when the engine no longer buffers them, the gap is counted and
  the batch applied (stores missed mean missed hits; removes missed leave entries that the next
  clear or the index's LRU bound removes);
- a number not above the last one: a new engine process (vLLM counts from 0 again at start),
  so the pod's blocks are cleared first (its cache is empty), then the batch is applied.

`AllBlocksCleared` clears the pod's blocks. Events of a tier other than `gpu` are indexed
under their tier; the scorers count every tier alike.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from epp.framework import LogLimiter
from epp_scorers.kvcache.index import BlockIndex
from epp_scorers.kvcache.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Message,
    WireError,
    decode_batch,
)

log = logging.getLogger(__name__)

MAX_LORA_NAMES: Final = 4096  # adapters recently stored (the least recently seen forgotten)
MAX_LORA_NAME_CHARS: Final = 1024  # a longer name is not an adapter a request can name
MAX_SOURCES: Final = 10_000  # sources whose last sequence is kept (the least recently heard forgotten)
# Warnings about a source's messages (malformed, lost, restarted): at most this many per interval.
WARN_BURST: Final = 10
WARN_INTERVAL_S: Final = 10.0

# Fetches batches [start, ...] from the engine's replay socket: (seq, payload) in order.
Replay = Callable[[int], Awaitable[Sequence[tuple[int, bytes]]]]


@dataclass(slots=True)
class ConsumerStats:
    batches: int = 0
    events: int = 0
    malformed: int = 0
    gaps: int = 0  # jumps in the sequence
    lost_batches: int = 0  # batches neither received nor replayed
    replayed: int = 0
    restarts: int = 0  # sequence went back: a new engine process
    clears: int = 0  # AllBlocksCleared
    sources: dict[str, int] = field(default_factory=dict)  # source -> last sequence applied


class EventConsumer:
    """Applies messages to `index`; `handle` takes one message of `source` about `pod`."""

    def __init__(self, index: BlockIndex) -> None:
        self.index = index
        self.stats = ConsumerStats()
        # LoRA adapter names seen in BlockStored events: a request for one of these models hashes
        # its blocks with the adapter's name as an extra key, as the engine did.
        # Adapter names seen in BlockStored events, most recently seen last: a request naming one
        # gets the LoRA extra key in its block hashes.
        self.lora_names: OrderedDict[str, None] = OrderedDict()
        self.warnings = LogLimiter(log, WARN_BURST, WARN_INTERVAL_S)  # a bad peer can send many

    async def handle(self, source: str, pod: str, message: Message, replay: Replay | None = None) -> None:
        try:
            batch = decode_batch(message.payload)
        except WireError as exc:
            self.malformed("KV events from %s: dropped a malformed batch: %s", source, exc)
            return
        sources = self.stats.sources
        last = sources.pop(source, None)  # put back last: the least recently heard come first
        if last is not None and message.seq <= last:
            self.stats.restarts += 1
            log.info(
                "KV events from %s: sequence went back (%d after %d): engine restarted",
                source,
                message.seq,
                last,
            )
            self.index.clear_pod(pod)
        elif last is not None and message.seq > last + 1:
            await self._fill_gap(source, pod, last + 1, message.seq, replay)
        self.apply(pod, batch)
        sources[source] = message.seq
        if len(sources) > MAX_SOURCES:
            del sources[next(iter(sources))]

    async def _fill_gap(self, source: str, pod: str, start: int, end: int, replay: Replay | None) -> None:
        self.stats.gaps += 1
        got = 0
        if replay is not None:
            try:
                for seq, payload in await replay(start):
                    if start + got <= seq < end:
                        try:
                            self.apply(pod, decode_batch(payload))
                        except WireError:
                            self.stats.malformed += 1
                        got += 1
            except (OSError, TimeoutError) as exc:
                self.warnings.log(
                    logging.WARNING, "KV events from %s: replay from %d failed: %s", source, start, exc
                )
        self.stats.replayed += got
        lost = end - start - got
        if lost > 0:
            self.stats.lost_batches += lost
            self.warnings.log(
                logging.WARNING,
                "KV events from %s: %d batches lost (sequence %d..%d)",
                source,
                lost,
                start,
                end - 1,
            )

    def malformed(self, msg: str, *args: object) -> None:
        """A message or batch dropped as malformed: counted, and logged (rate-limited)."""
        self.stats.malformed += 1
        self.warnings.log(logging.WARNING, msg, *args)

    def _saw_lora(self, name: str) -> None:
        names = self.lora_names
        if name in names:
            names.move_to_end(name)
            return
        names[name] = None
        if len(names) > MAX_LORA_NAMES:
            names.popitem(last=False)

    def forget(self, source: str) -> None:
        self.stats.sources.pop(source, None)

    def apply(self, pod: str, batch: EventBatch) -> None:
        self.stats.batches += 1
        index = self.index
        for event in batch.events:
            self.stats.events += 1
            if isinstance(event, BlockStored):
                index.add(pod, event.keys, event.tier)
                name = event.lora_name
                if name and len(name) <= MAX_LORA_NAME_CHARS:
                    self._saw_lora(name)
            elif isinstance(event, BlockRemoved):
                index.remove(pod, event.keys, event.tier)
            elif isinstance(event, AllBlocksCleared):
                self.stats.clears += 1
                index.clear_pod(pod)
