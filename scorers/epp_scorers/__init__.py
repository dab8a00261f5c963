"""epp's in-tree plugins: scorers, filters, pickers, producers, profile handlers, P/D deciders,
and the Go parser / data-source types epp covers natively.

Installed as `epp_scorers` and registered through the same `epp.plugins` entry point a
third-party package uses (`register` below), so the in-tree plugins prove that the public API
in `epp.framework` is enough: nothing here imports any other part of epp.
"""

from epp.framework import PluginRegistry


def register(registry: PluginRegistry) -> None:
    """The `epp.plugins` entry point of this package: every in-tree plugin, and the producers the
    loader adds when a plugin consumes their data and the config declares none."""
    from epp_scorers.catalog import ALL_PLUGINS
    from epp_scorers.data import INFLIGHT_LOAD, PREFIX_MATCH
    from epp_scorers.producers.predicted_latency import LATENCY_PREDICTION

    for cls in ALL_PLUGINS:
        registry.register(cls)
    registry.register_default_producer(PREFIX_MATCH, "approx-prefix-cache-producer")
    registry.register_default_producer(INFLIGHT_LOAD, "inflight-load-producer")
    registry.register_default_producer(LATENCY_PREDICTION, "predicted-latency-producer")
