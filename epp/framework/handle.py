"""What the core gives a plugin: its metrics, the in-flight ledger, and its peers by name.

Plugins register their own Prometheus metrics through the handle, so the core knows none of
them. Asking twice for one metric name returns the same metric (several instances of a plugin
type share their series).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp.framework.histogram import LeanHistogram
from epp.framework.inflight import InFlightLedger
from epp.framework.plugin import Plugin

M = TypeVar("M")


class PluginHandle:
    def __init__(
        self, registry: CollectorRegistry | None = None, ledger: InFlightLedger | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.ledger = ledger or InFlightLedger()
        self._metrics: dict[str, Any] = {}
        self._gauge_parts: dict[str, list[Callable[[], float]]] = {}
        # Filled by the loader before `bind`: every plugin by name, and the profile names.
        self.plugins: Mapping[str, Plugin] = {}
        self.profile_names: Sequence[str] = ()

    def plugin(self, name: str) -> Plugin | None:
        return self.plugins.get(name)

    def _metric(self, name: str, kind: type[M], make: Callable[[], M]) -> M:
        """The metric registered under `name`, made by `make` the first time it is asked for."""
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = make()
        assert isinstance(metric, kind), f"metric {name} is registered as another type"
        return metric

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return self._metric(
            name, Counter, lambda: Counter(name, documentation, labels, registry=self.registry)
        )

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> Histogram:
        kwargs: dict[str, Any] = {"buckets": tuple(buckets)} if buckets else {}
        return self._metric(
            name, Histogram, lambda: Histogram(name, documentation, labels, registry=self.registry, **kwargs)
        )

    def lean_histogram(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> LeanHistogram:
        """A histogram for the request path (`LeanHistogram`: no lock, about five times cheaper an
        observation than `histogram`'s); observe it on the event loop only, never from a thread.
        Its series are `labels(*values)` (no values for an unlabelled one)."""
        return self._metric(
            name, LeanHistogram, lambda: LeanHistogram(name, documentation, labels, buckets, self.registry)
        )

    def gauge_sum(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """An unlabelled gauge whose value, computed when /metrics is read, is the sum of `read()`
        over every plugin that registered one under `name` (e.g. index sizes)."""
        parts = self._gauge_parts.get(name)
        if parts is None:
            parts = self._gauge_parts[name] = []
            gauge = Gauge(name, documentation, registry=self.registry)
            gauge.set_function(lambda: float(sum(part() for part in parts)))
            self._metrics[name] = gauge
        parts.append(read)
