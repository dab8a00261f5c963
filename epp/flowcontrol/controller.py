"""The flow controller: bounded queues by priority band and flow, dispatch as capacity frees.

A request either goes at once (nothing of its priority or higher is waiting and the pool's
saturation is below its band's ceiling), or waits in its band's queue for its flow (fairness id).
Dispatch walks the bands highest first: the first band whose ceiling (the usage limit policy's;
1.0 without one) the saturation has reached stops it; otherwise the first non-empty band is
served, the fairness policy picking the flow and the ordering policy the request. One request is
dispatched per event-loop turn, so each is scheduled and charged to the in-flight ledger before
the next saturation reading.

Dispatch runs when something may have freed capacity: a request completes (`wake`, from the
director), a request arrives, and, while requests wait on a saturated pool, once per metrics
refresh interval (scraped metrics may have changed). Nothing runs while the queues are empty.

Every request ends with one outcome: Dispatched, RejectedCapacity (its band, or the global limit,
is full: bounded memory), RejectedNoEndpoints, RejectedOther (shutting down), EvictedTTL (its TTL
ran out while it waited), EvictedNoEndpoints, EvictedContextCancelled (the client went away) or
EvictedOther (epp is stopping).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from epp.flowcontrol.config import BandConfig, FlowControlConfig
from epp.flowcontrol.metrics import FlowControlMetrics
from epp.framework.datamodel import Endpoint
from epp.framework.plugin import FlowItem, SaturationDetector
from epp.supervision import Supervisor, current_supervisor


class Outcome(enum.Enum):
    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


@dataclass(slots=True, eq=False)
class _Waiter:
    item: FlowItem
    key: tuple[float, ...]
    future: asyncio.Future[Outcome]
    queued: bool = False  # in its flow's queue; false once popped or gone (the entry goes lazily)


@dataclass(slots=True)
class _Flow:
    """One flow's queue (a FlowQueue for fairness policies; never empty while in its band).

    A request that leaves before its turn (cancelled, expired) is marked and its heap entry left
    where it is: taking it out at once meant a scan and a re-heapify of the flow, quadratic when
    a whole queue of thousands is cancelled together. The top entry is always a live one, and
    the heap is rebuilt from its live entries once they are fewer than the dead ones."""

    heap: list[tuple[tuple[float, ...], int, _Waiter]] = field(default_factory=list)
    live: int = 0

    @property
    def head(self) -> FlowItem:
        return self.heap[0][2].item

    @property
    def head_key(self) -> tuple[float, ...]:
        return self.heap[0][0]

    def __len__(self) -> int:
        return self.live

    def push(self, waiter: _Waiter) -> None:
        heapq.heappush(self.heap, (waiter.key, waiter.item.seq, waiter))
        waiter.queued = True
        self.live += 1

    def pop(self) -> _Waiter:
        _, _, waiter = heapq.heappop(self.heap)
        waiter.queued = False
        self.live -= 1
        self._surface()
        return waiter

    def discard(self, waiter: _Waiter) -> None:
        waiter.queued = False
        self.live -= 1
        dead = len(self.heap) - self.live
        if dead > max(self.live, _COMPACT_AT):
            self.heap = [entry for entry in self.heap if entry[2].queued]
            heapq.heapify(self.heap)
        else:
            self._surface()

    def waiters(self) -> list[_Waiter]:
        return [entry[2] for entry in self.heap if entry[2].queued]

    def _surface(self) -> None:
        heap = self.heap
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)


_COMPACT_AT = 64  # dead entries a flow's heap may hold before it is rebuilt
MAX_UNLISTED_BANDS = 256  # bands of priorities the config does not list, kept while empty


@dataclass(slots=True)
class _Band:
    config: BandConfig
    flows: dict[str, _Flow] = field(default_factory=dict)  # only flows with requests waiting
    count: int = 0
    bytes: int = 0
    last: str | None = None  # the flow served last (for round robin)


class FlowController:
    def __init__(
        self,
        config: FlowControlConfig,
        detector: SaturationDetector,
        candidates: Callable[[], Sequence[Endpoint]],
        metrics: FlowControlMetrics | None = None,
        recheck_s: float = 0.05,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        self.detector = detector
        self._supervisor = supervisor
        self._candidates = candidates
        self.metrics = metrics
        self.recheck_s = recheck_s
        self._bands: dict[int, _Band] = {}
        self._order: list[_Band] = []  # highest priority first
        self._count = 0
        self._bytes = 0
        self._in_transit = 0  # dispatched, not yet resumed (so not yet charged to the ledger)
        self._seq = itertools.count()
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        self.stopped = False
        self._configured = frozenset(config.bands)
        for priority in config.bands:  # the configured bands exist from the start, as in Go
            self._band(priority)

    @property
    def queued(self) -> int:
        return self._count

    def _band(self, priority: int) -> _Band:
        band = self._bands.get(priority)
        if band is None:
            if len(self._bands) - len(self._configured) >= MAX_UNLISTED_BANDS:
                self._forget_empty_bands()
            band = self._bands[priority] = _Band(self.config.band_for(priority))
            self._order = sorted(self._bands.values(), key=lambda b: -b.config.priority)
        return band

    def _forget_empty_bands(self) -> None:
        """Bands of priorities the config does not list are made as requests bring them (an
        objective's priority edited over and over brings many): the empty ones go."""
        for priority, band in list(self._bands.items()):
            if not band.count and priority not in self._configured:
                del self._bands[priority]

    def _gated_at(self, stop: int | None = None) -> int | None:
        """Walking the bands highest first (down to the band of priority `stop`, if given): the
        index of the first band whose ceiling the pool's saturation has reached, else None."""
        saturation = self.detector.saturation(self._candidates())
        if self.metrics is not None:
            self.metrics.observe_saturation(saturation)
        policy = self.config.usage_limit
        if policy is None:
            return 0 if saturation >= 1.0 else None
        ceilings = policy.ceilings(saturation, [b.config.priority for b in self._order])
        for i, band in enumerate(self._order):
            if saturation >= ceilings[i]:
                return i
            if band.config.priority == stop:
                break
        return None

    async def enqueue_and_wait(
        self,
        request_id: str,
        fairness_id: str,
        priority: int,
        byte_size: int,
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Wait for the request's turn; returns its outcome. Cancelled (the client went away):
        the request leaves its queue and the cancellation goes on. `headers` (the request's) are
        what ordering policies may read (e.g. an SLO)."""
        started = time.monotonic()
        band = self._band(priority)
        if (
            self._in_transit == 0
            and not self._waiting_at_or_above(priority)
            and self._gated_at(priority) is None
        ):
            return self._finish(Outcome.DISPATCHED, fairness_id, priority, 0.0)
        if self.stopped:  # draining: what can go at once still goes, nothing new waits
            return self._finish(Outcome.REJECTED_OTHER, fairness_id, priority, None)
        cfg, config = band.config, self.config
        if (
            band.count >= cfg.max_requests
            or band.bytes + byte_size > cfg.max_bytes
            or (config.max_requests and self._count >= config.max_requests)
            or (config.max_bytes and self._bytes + byte_size > config.max_bytes)
        ):
            outcome = Outcome.REJECTED_CAPACITY if self._candidates() else Outcome.REJECTED_NO_ENDPOINTS
            return self._finish(outcome, fairness_id, priority, None)
        ttl = config.ttl_s if self._candidates() else config.no_endpoint_ttl_s
        item = FlowItem(
            request_id,
            fairness_id,
            priority,
            byte_size,
            started,
            started + ttl if ttl > 0 else float("inf"),
            next(self._seq),
            {} if headers is None else headers,
        )
        waiter = _Waiter(item, cfg.ordering.key(item), asyncio.get_running_loop().create_future())
        self._push(band, waiter)
        self._kick()
        try:
            if ttl > 0:
                async with asyncio.timeout(ttl):
                    outcome = await waiter.future
            else:
                outcome = await waiter.future
        except TimeoutError:
            # Cancelling the wait cancels the future, unless it was answered in that same turn.
            if waiter.future.done() and not waiter.future.cancelled():
                outcome = waiter.future.result()
                if outcome is Outcome.DISPATCHED:
                    return self._resumed(waiter, time.monotonic() - started)
                return self._finish(outcome, fairness_id, priority, time.monotonic() - started)
            self._remove(band, waiter)
            outcome = Outcome.EVICTED_TTL if self._candidates() else Outcome.EVICTED_NO_ENDPOINTS
            return self._finish(outcome, fairness_id, priority, time.monotonic() - started)
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Answered in the same turn as the cancel: a dispatch was counted in transit; an
                # eviction (stop) was not, and was taken off its band already.
                if waiter.future.result() is Outcome.DISPATCHED:
                    self._in_transit -= 1
                    self._kick()
            else:
                self._remove(band, waiter)
            self._finish(Outcome.EVICTED_CONTEXT_CANCELLED, fairness_id, priority, time.monotonic() - started)
            raise
        if outcome is Outcome.DISPATCHED:
            return self._resumed(waiter, time.monotonic() - started)
        return self._finish(outcome, fairness_id, priority, time.monotonic() - started)

    def _resumed(self, waiter: _Waiter, waited_s: float) -> Outcome:
        self._in_transit -= 1
        self._kick()  # runs after this request has been scheduled (same event-loop turn)
        return self._finish(Outcome.DISPATCHED, waiter.item.fairness_id, waiter.item.priority, waited_s)

    def _finish(self, outcome: Outcome, fairness_id: str, priority: int, waited_s: float | None) -> Outcome:
        if self.metrics is not None:
            self.metrics.outcome(outcome.value, fairness_id, priority, waited_s)
        return outcome

    def _waiting_at_or_above(self, priority: int) -> bool:
        return any(b.count for b in self._order if b.config.priority >= priority)

    def _push(self, band: _Band, waiter: _Waiter) -> None:
        item = waiter.item
        flow = band.flows.get(item.fairness_id)
        if flow is None:
            flow = band.flows[item.fairness_id] = _Flow()
        flow.push(waiter)
        self._account(band, item, 1)

    def _remove(self, band: _Band, waiter: _Waiter) -> None:
        """Take a request that leaves before its turn out of its queue (amortised O(log n))."""
        item = waiter.item
        flow = band.flows.get(item.fairness_id)
        if flow is None or not waiter.queued:
            return  # dispatched (or answered at stop) already
        flow.discard(waiter)
        if not flow.live:
            del band.flows[item.fairness_id]
        self._account(band, item, -1)

    def _account(self, band: _Band, item: FlowItem, sign: int) -> None:
        band.count += sign
        band.bytes += sign * item.byte_size
        self._count += sign
        self._bytes += sign * item.byte_size
        if self.metrics is not None:
            self.metrics.queued(item.fairness_id, item.priority, item.byte_size, sign)

    # --- dispatch ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Capacity may have freed (a request completed, an endpoint joined)."""
        if self._count:
            self._kick()

    def _kick(self) -> None:
        if not self._kicked and self._count:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Dispatch the next request, if capacity allows (a loop callback, not a task: an error in a
        plugin it calls is logged and counted by the supervisor, and the dispatch is tried again a
        recheck later rather than never, which would leave the queues to their TTLs)."""
        self._kicked = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._count or self._in_transit or self.stopped:
            return
        try:
            self._dispatch_next()
        except Exception as exc:
            (self._supervisor or current_supervisor()).failed("flow-control-dispatch", exc)
            if self._timer is None and not self.stopped:
                self._timer = asyncio.get_running_loop().call_later(self.recheck_s, self._dispatch)

    def _dispatch_next(self) -> None:
        gated = self._gated_at()
        band = next((b for b in self._order[:gated] if b.count), None)
        if band is None:
            # Scraped metrics change without an event: look again after a refresh interval.
            self._timer = asyncio.get_running_loop().call_later(self.recheck_s, self._dispatch)
            return
        fid = band.config.fairness.pick_queue(band.flows, band.last)
        band.last = fid
        flow = band.flows[fid]
        waiter = flow.pop()
        if not flow.live:
            del band.flows[fid]
        self._account(band, waiter.item, -1)
        if waiter.future.done():  # its wait was cancelled this turn: it is leaving, try the next
            self._kick()
            return
        self._in_transit += 1
        waiter.future.set_result(Outcome.DISPATCHED)

    def stop(self) -> None:
        """epp is stopping: every waiting request is answered at once (503, shutting down); a
        request arriving later goes if it can go at once, else it is refused the same way."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for band in self._order:
            for flow in list(band.flows.values()):
                for waiter in flow.waiters():
                    waiter.queued = False
                    self._account(band, waiter.item, -1)
                    if not waiter.future.done():
                        waiter.future.set_result(Outcome.EVICTED_OTHER)
                flow.heap.clear()
                flow.live = 0
            band.flows.clear()
