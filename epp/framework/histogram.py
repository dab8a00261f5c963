"""A histogram for the request path: prometheus_client's exposition, without its locks.

prometheus_client's `Histogram.observe` takes a lock and walks its buckets (about 0.8 us); epp
records on its one event-loop thread, so a bisect and two additions do (about 0.15 us). The core's
request metrics and plugins' own (`PluginHandle.lean_histogram`) use it. /metrics is rendered on a
worker thread: `collect` copies the series list, and reads plain counts (at worst a scrape sees an
observation's bucket before its sum).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class HistogramChild:
    """One series of a `LeanHistogram`: per-bucket counts (the last is +Inf) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class LeanHistogram(Collector):
    """A histogram for the request path, exposed exactly as prometheus_client's: `observe` is a
    bisect and two additions, no locks (epp records and serves /metrics on one event-loop
    thread), about five times cheaper. Streaming responses observe once per chunk."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets if b != math.inf)
        self._le = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        # Series resolved ahead of their first observation, exposed only from it (as a series
        # created when first observed is, the Go EPP's way for e.g. each plugin's durations).
        self._unseen_until_observed: set[tuple[str, ...]] = set()
        registry.register(self)

    def labels(self, *values: str, exposed_before_observed: bool = True) -> HistogramChild:
        """The series of these label values; with `exposed_before_observed=False` (when first
        asked for), /metrics shows it only once it has an observation."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self._bounds)
            if not exposed_before_observed:
                self._unseen_until_observed.add(values)
        return child

    def remove(self, *values: str) -> None:
        del self._children[values]
        self._unseen_until_observed.discard(values)

    def describe(self) -> Iterator[Metric]:
        yield Metric(self._name, self._documentation, "histogram")

    def collect(self) -> Iterator[Metric]:
        family = Metric(self._name, self._documentation, "histogram")
        bucket, count, total = f"{self._name}_bucket", f"{self._name}_count", f"{self._name}_sum"
        unseen = self._unseen_until_observed
        for values, child in list(self._children.items()):
            if values in unseen and not any(child.counts):
                continue
            labels = dict(zip(self._labelnames, values, strict=True))
            cumulative = 0
            for le, n in zip(self._le, child.counts, strict=False):
                cumulative += n
                family.add_sample(bucket, {**labels, "le": le}, cumulative)
            cumulative += child.counts[-1]
            family.add_sample(bucket, {**labels, "le": "+Inf"}, cumulative)
            family.add_sample(count, labels, cumulative)
            family.add_sample(total, labels, child.sum)
        yield family
