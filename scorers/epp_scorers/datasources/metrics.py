"""Go EPP data-source types whose job epp does natively: `metrics-data-source` and
`core-metrics-extractor`.

The Go EPP's Helm chart declares its metrics scraping as plugins. epp always scrapes vLLM and
SGLang metrics itself, outside the plugin system, so these types are accepted so that such
configs load, do nothing, and are reported with a warning that names any parameters given (all
are ignored).

- `metrics-data-source`: epp scrapes http://<endpoint>/metrics itself, every
  `--refresh-metrics-interval`.
- `core-metrics-extractor`: epp reads vLLM and SGLang metrics itself (the engine from the
  `llm-d.ai/engine-type` pod label).

Consumes: nothing. Produces: nothing. Parameters: any, all ignored.

    plugins:
    - type: metrics-data-source
    - type: core-metrics-extractor
"""

from __future__ import annotations

from typing import ClassVar, Self

from epp.framework import DataSource, Params, PluginHandle
from epp_scorers.parsers.openai import warn_built_in


class MetricsDataSource(DataSource):
    """Accepted for Go EPP configs and ignored: epp scrapes each endpoint's /metrics itself
    (`--refresh-metrics-interval`)."""

    type_name = "metrics-data-source"
    built_in: ClassVar[str] = "epp scrapes http://<endpoint>/metrics itself (--refresh-metrics-interval)"

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        warn_built_in(params, cls.built_in)
        return cls(name)


class CoreMetricsExtractor(DataSource):
    """Accepted for Go EPP configs and ignored: epp reads vLLM and SGLang metrics itself (engine
    from the `llm-d.ai/engine-type` label)."""

    type_name = "core-metrics-extractor"
    built_in: ClassVar[str] = "epp reads vLLM and SGLang metrics itself (engine: llm-d.ai/engine-type)"

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        warn_built_in(params, cls.built_in)
        return cls(name)
