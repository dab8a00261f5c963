"""The request path's histogram (`LeanHistogram`): what /metrics shows of it is what
prometheus_client's own Histogram shows for the same observations."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from epp.framework import LeanHistogram, PluginHandle
from epp.observability import EppMetrics

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
OBSERVED = (0.0, 0.001, 0.0011, 0.05, 0.1, 3.0, 10.0, 11.0, 1e9)


def exposition(histogram_type: type, labels: tuple[str, ...], values: tuple[str, ...]) -> bytes:
    EppMetrics()  # epp's exposition, process-wide: no `*_created` series (the Go EPP has none)
    registry = CollectorRegistry()
    if histogram_type is LeanHistogram:
        series = LeanHistogram("h", "help", labels, BUCKETS, registry).labels(*values)
    else:
        metric = Histogram("h", "help", labels, registry=registry, buckets=BUCKETS)
        series = metric.labels(*values) if labels else metric
    for amount in OBSERVED:
        series.observe(amount)
    return generate_latest(registry)


@pytest.mark.parametrize(("labels", "values"), [((), ()), (("a", "b"), ("x", 'q"uote'))])
def test_its_page_is_prometheus_clients(labels: tuple[str, ...], values: tuple[str, ...]) -> None:
    lean = exposition(LeanHistogram, labels, values)
    assert lean == exposition(Histogram, labels, values)
    assert b'le="+Inf"' in lean and b"_created" not in lean


def test_a_series_asked_for_ahead_shows_from_its_first_observation_only() -> None:
    registry = CollectorRegistry()
    histogram = LeanHistogram("h", "help", ("plugin",), BUCKETS, registry)
    ahead = histogram.labels("ahead", exposed_before_observed=False)
    histogram.labels("plain")
    assert registry.get_sample_value("h_count", {"plugin": "plain"}) == 0
    assert registry.get_sample_value("h_count", {"plugin": "ahead"}) is None
    ahead.observe(0.5)
    assert registry.get_sample_value("h_count", {"plugin": "ahead"}) == 1
    assert registry.get_sample_value("h_sum", {"plugin": "ahead"}) == 0.5
    histogram.remove("ahead")
    assert registry.get_sample_value("h_count", {"plugin": "ahead"}) is None


def test_the_handle_gives_one_lean_histogram_per_name() -> None:
    handle = PluginHandle()
    first = handle.lean_histogram("plugin_latency_seconds", "help", ("plugin",), BUCKETS)
    assert handle.lean_histogram("plugin_latency_seconds", "help", ("plugin",), BUCKETS) is first
    first.labels("p").observe(0.002)
    assert (
        handle.registry.get_sample_value("plugin_latency_seconds_bucket", {"plugin": "p", "le": "0.01"}) == 1
    )
    handle.counter("plugin_requests_total", "help")
    with pytest.raises(AssertionError, match="registered as another type"):
        handle.lean_histogram("plugin_requests_total", "help", (), BUCKETS)
    with pytest.raises(ValueError, match="expected labels"):
        first.labels("p", "extra")
