"""What the core gives a plugin: its metrics, the in-flight ledger, and its peers by name.

Plugins register their own Prometheus metrics through the handle, so the core knows none of
them. Asking twice for one metric name returns the same metric (several instances of a plugin
type share their series).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp.framework.histogram import LeanHistogram
from epp.framework.inflight import InFlightLedger
from epp.framework.plugin import Plugin


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

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = Counter(name, documentation, labels, registry=self.registry)
        assert isinstance(metric, Counter), f"metric {name} is registered as another type"
        return metric

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> Histogram:
        metric = self._metrics.get(name)
        if metric is None:
            kwargs: dict[str, Any] = {"buckets": tuple(buckets)} if buckets else {}
            metric = self._metrics[name] = Histogram(
                name, documentation, labels, registry=self.registry, **kwargs
            )
        assert isinstance(metric, Histogram), f"metric {name} is registered as another type"
        return metric

    def lean_histogram(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> LeanHistogram:
        """A histogram for the request path (`LeanHistogram`: no lock, about five times cheaper an
        observation than `histogram`'s); observe it on the event loop only, never from a thread.
        Its series are `labels(*values)` (no values for an unlabelled one)."""
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = LeanHistogram(name, documentation, labels, buckets, self.registry)
        assert isinstance(metric, LeanHistogram), f"metric {name} is registered as another type"
        return metric

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
