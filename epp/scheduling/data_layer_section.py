"""The loader's `dataLayer` section: Go's wiring of data sources to extractors, and the metrics
source and extractor epp's scraper uses (`MetricsDataLayer`); the metrics plugins' own settings are
checked when they are built, as Go's factories check them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp.datalayer.scraper import MetricsExtractorParams, MetricsSourceParams, ScrapeConfig, engines_of
from epp.framework import BackgroundService, DataSource
from epp.scheduling.config_reader import ConfigReader

_DATA_LAYER_FIELDS = (
    "injectDefaults",
    "sources",
    "discovery",
    "peerDiscovery",
    "crossReplicaSyncerPluginRef",
    "crossReplicaSyncInterval",
)
_DATA_SOURCE_FIELDS = ("pluginRef", "extractors")
METRICS_SOURCE_NAME = "metrics-data-source"
METRICS_EXTRACTOR_NAME = "core-metrics-extractor"


@dataclass(frozen=True)
class MetricsDataLayer:
    """The metrics data source and extractor the config wires for epp's scraper (None: the Go
    EPP's default ones, i.e. the defaults and the flags)."""

    source: MetricsSourceParams | None = None
    extractor: MetricsExtractorParams | None = None


class DataLayerSection(ConfigReader):
    """Reads `dataLayer` once every plugin exists (its sources and extractors are plugins)."""

    def check_data_plugins(self) -> None:
        """Metric specs, the default engine and https files of every metrics data source and
        extractor, checked when the plugin is built (as Go's factories check them)."""
        for name, plugin in self.instances.items():
            try:
                if isinstance(plugin, MetricsExtractorParams):
                    engines_of(plugin)
                if isinstance(plugin, MetricsSourceParams):
                    ScrapeConfig().with_source(plugin)
            except ValueError as exc:
                raise self.error(f"{self._describe(name)}: {exc}") from None

    def data_layer(self, doc: Mapping[str, Any]) -> MetricsDataLayer:
        """Go's data layer: the listed sources with their extractors, plus (unless
        `injectDefaults: false`, or a source is the plugin named `metrics-data-source`) the plugins
        named `metrics-data-source` and `core-metrics-extractor`, declared or default. epp scrapes
        one metrics page per endpoint, with the first metrics source and its extractor."""
        layer = self._mapping(doc.get("dataLayer"), _DATA_LAYER_FIELDS, "dataLayer")
        inject = layer.get("injectDefaults", True)
        if not isinstance(inject, bool):
            raise self.error(f"dataLayer.injectDefaults must be true or false, got {inject!r}")
        chosen: list[tuple[MetricsSourceParams | None, MetricsExtractorParams | None, str]] = []
        wired: set[str] = set()
        source_refs: list[str] = []
        for i, entry in enumerate(self._list(layer.get("sources"), "dataLayer.sources")):
            where = f"dataLayer.sources[{i}]"
            spec = self._mapping(entry, _DATA_SOURCE_FIELDS, where)
            ref = self._ref({"pluginRef": spec.get("pluginRef")}, where)
            source_refs.append(ref)
            plugin = self.instances.get(ref)
            if plugin is None:
                raise self.error(f"{where} references undefined plugin {ref!r}")
            if not isinstance(plugin, DataSource) or isinstance(plugin, MetricsExtractorParams):
                raise self.error(f"{where}: {self._describe(ref)} is not a data source")
            extractors: list[str] = []
            for j, ext in enumerate(self._list(spec.get("extractors"), f"{where}.extractors")):
                ext_ref = self._ref(ext, f"{where}.extractors[{j}]")
                if ext_ref not in self.instances:
                    raise self.error(f"{where}.extractors[{j}] references undefined plugin {ext_ref!r}")
                extractors.append(ext_ref)
            wired.update((ref, *extractors))
            if not isinstance(plugin, MetricsSourceParams):
                if not isinstance(plugin, BackgroundService):  # one that runs in epp does its own work
                    what = "is not run by epp (it scrapes model-server metrics only)"
                    self.warn(f"{where}: {self._describe(ref)} {what}")
                continue
            metric_extractors = []
            for ext_ref in extractors:
                candidate = self.instances[ext_ref]
                if not isinstance(candidate, MetricsExtractorParams):
                    raise self.error(
                        f"{where}: {self._describe(ext_ref)} cannot extract the metrics of "
                        f"{self._describe(ref)}"
                    )
                metric_extractors.append(candidate)
            if not metric_extractors:
                self.warn(
                    f"{where}: {self._describe(ref)} has no extractor (the Go EPP would read no metrics "
                    "from it); epp reads it with the built-in engine mappings"
                )
            chosen.append((plugin, metric_extractors[0] if metric_extractors else None, ref))
        if inject and METRICS_SOURCE_NAME not in source_refs:
            default_source = self.instances.get(METRICS_SOURCE_NAME)
            default_extractor = self.instances.get(METRICS_EXTRACTOR_NAME)
            for default_name, declared, kind in (
                (METRICS_SOURCE_NAME, default_source, MetricsSourceParams),
                (METRICS_EXTRACTOR_NAME, default_extractor, MetricsExtractorParams),
            ):
                if declared is not None and not isinstance(declared, kind):
                    raise self.error(
                        f"{self._describe(default_name)} takes the name of the default {default_name}, "
                        "which the data layer adds; rename it"
                    )
                wired.add(default_name)
            chosen.append(
                (
                    default_source if isinstance(default_source, MetricsSourceParams) else None,
                    default_extractor if isinstance(default_extractor, MetricsExtractorParams) else None,
                    METRICS_SOURCE_NAME,
                )
            )
        for name, plugin in self.instances.items():
            if name not in wired and isinstance(plugin, MetricsSourceParams | MetricsExtractorParams):
                self.warn(
                    f"{self._describe(name)} is not in the data layer, so neither the Go EPP nor epp "
                    "uses it; list it under dataLayer.sources, or name it after its type"
                )
        self._data_layer_extras(layer)
        if not chosen:
            self.warn(
                "dataLayer.injectDefaults is false and no metrics-data-source is listed: the Go EPP "
                "would collect no metrics; epp scrapes each endpoint's /metrics with the flags' settings"
            )
            return MetricsDataLayer()
        if len(chosen) > 1:
            self.warn(
                f"epp reads one metrics page per endpoint: it uses {chosen[0][2]!r} and ignores "
                + ", ".join(repr(c[2]) for c in chosen[1:])
            )
        source_plugin, extractor_plugin, _ = chosen[0]
        try:
            ScrapeConfig().with_source(source_plugin, extractor_plugin)
        except ValueError as exc:
            raise self.error(f"dataLayer: {exc}") from None
        return MetricsDataLayer(source_plugin, extractor_plugin)

    def _data_layer_extras(self, layer: Mapping[str, Any]) -> None:
        """Endpoint discovery, peer discovery and cross-replica sync by plugin: epp has none of
        those plugin kinds, so a reference names an undefined plugin or one of the wrong kind."""
        for key, kind in (("discovery", "endpoint discovery"), ("peerDiscovery", "peer discovery")):
            if layer.get(key) is not None:
                ref = self._ref(layer[key], f"dataLayer.{key}")
                self._wrong_kind(ref, f"dataLayer.{key}", kind)
        syncer = layer.get("crossReplicaSyncerPluginRef")
        if syncer is not None:
            if not isinstance(syncer, str):
                raise self.error(f"dataLayer.crossReplicaSyncerPluginRef must be a string, got {syncer!r}")
            if syncer:
                self._wrong_kind(syncer, "dataLayer.crossReplicaSyncerPluginRef", "cross-replica syncer")
        if layer.get("crossReplicaSyncInterval") is not None:
            self._duration(layer["crossReplicaSyncInterval"], "dataLayer.crossReplicaSyncInterval")
            self.warn(
                "dataLayer.crossReplicaSyncInterval is not implemented by epp and is ignored "
                "(no cross-replica syncer)"
            )

    def _wrong_kind(self, ref: str, where: str, kind: str) -> None:
        if ref not in self.instances:
            raise self.error(f"{where} references undefined plugin {ref!r}")
        raise self.error(f"{where}: {self._describe(ref)} is not a {kind} plugin (epp has none)")
