"""The Go EPP's metrics data layer: `metrics-data-source` (where each model server's metrics page
is read) and `core-metrics-extractor` (which series hold the queue, running requests, KV-cache
usage, LoRA and cache info, per engine).

epp's scraper does the polling and the parsing; these plugins carry their parameters to it. The
loader picks the data source and extractor the config's `dataLayer` (or, without one, the Go
EPP's default: the plugins named `metrics-data-source` and `core-metrics-extractor`) wires
together, and epp scrapes with them. A parameter a plugin is given wins over the matching
`--model-server-metrics-*` / `*-metric` flag, which wins over the default, as in the Go EPP.

- `metrics-data-source`: `scheme` (http or https, default http), `path` (default /metrics),
  `port` (default: the endpoint's port), `insecureSkipVerify` (https: do not verify the server's
  certificate, default true), `caCertPath` (a PEM bundle to verify it with), `clientCertPath` and
  `clientKeyPath` (mTLS), `interval` (a Go duration, rounded to a multiple of
  `--refresh-metrics-interval`; default: every interval).
- `core-metrics-extractor`: `engineLabelKey` (the pod label naming the engine, default
  `llm-d.ai/engine-type`, with `inference.networking.k8s.io/engine-type` as a fallback),
  `defaultEngine` (the engine of pods without the label, default vllm: an SGLang pool without
  the label needs `sglang`), and `engineConfigs`: per engine `name` and the metric specs
  `queuedRequestsSpec`, `runningRequestsSpec`, `kvUsageSpec`, `loraSpec`, `cacheInfoSpec`
  (labels `cacheBlockSizeLabelName`, `cacheNumBlocksLabelName`), `cacheBlockSizeSpec`,
  `cacheNumBlocksSpec`, each `name` or `name{label="value"}` (empty: not read), and
  `customMetrics` (checked, then ignored with a warning: no epp plugin reads them). An entry
  replaces the built-in mapping of that engine (vllm, sglang, trtllm-serve,
  triton-tensorrt-llm, triton) whole.

Consumes: nothing. Produces: nothing (the endpoints' scraped metrics).

    plugins:
    - type: metrics-data-source
      parameters: {scheme: https, path: /prometheus/metrics, insecureSkipVerify: false}
    - type: core-metrics-extractor
      parameters: {defaultEngine: sglang}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Self

from epp.framework import ConfigError, DataSource, ParamDoc, Params, PluginHandle

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """A Go `time.ParseDuration` string ("500ms", "1m30s", "0") in seconds. Raises ValueError."""
    rest = text.strip()
    sign = -1.0 if rest.startswith("-") else 1.0
    rest = rest.lstrip("+-")
    if rest == "0":
        return 0.0
    total = 0.0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    while rest:
        m = _DURATION_PART.match(rest)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 1s, 1m30s)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        rest = rest[m.end() :]
    return sign * total


def _optional_str(params: Params, key: str) -> str | None:
    value = params.get_str(key, "")
    return value or None


class MetricsDataSource(DataSource):
    """Where each model server's metrics page is read: `scheme`://endpoint:`port``path`, every
    `interval`. Its parameters win over the `--model-server-metrics-*` flags."""

    type_name = "metrics-data-source"
    parameters = (
        ParamDoc("scheme", "string", "http", "http or https."),
        ParamDoc("path", "string", "/metrics", "Path of the metrics page."),
        ParamDoc("port", "int", "the endpoint's port", "Port of the metrics page, 1-65535."),
        ParamDoc("insecureSkipVerify", "bool", "true", "https: do not verify the server's certificate."),
        ParamDoc("caCertPath", "string", "", "https: PEM CA bundle to verify the server with."),
        ParamDoc("clientCertPath", "string", "", "https: client certificate (mTLS), with clientKeyPath."),
        ParamDoc("clientKeyPath", "string", "", "https: the client certificate's key."),
        ParamDoc("interval", "duration", "--refresh-metrics-interval", "Scrape period (e.g. 1s)."),
    )

    def __init__(
        self,
        name: str = "",
        *,
        scheme: str | None = None,
        path: str | None = None,
        port: int | None = None,
        insecure_skip_verify: bool | None = None,
        ca_cert_path: str | None = None,
        client_cert_path: str | None = None,
        client_key_path: str | None = None,
        interval_s: float | None = None,
    ) -> None:
        super().__init__(name)
        # None: not given (the flag, else the default, applies).
        self.scheme = scheme
        self.path = path
        self.port = port
        self.insecure_skip_verify = insecure_skip_verify
        self.ca_cert_path = ca_cert_path
        self.client_cert_path = client_cert_path
        self.client_key_path = client_key_path
        self.interval_s = interval_s

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        scheme = _optional_str(params, "scheme")
        if scheme is not None and scheme not in ("http", "https"):
            raise ConfigError(f"unsupported scheme: {scheme!r} (use http or https)")
        path = _optional_str(params, "path")
        if path is not None and not path.startswith("/"):
            path = "/" + path  # Go's URL writer puts the slash in
        port: int | None = params.get_int("port", -1)
        if port == -1:
            port = None  # not given
        elif port is not None and not 1 <= port <= 65535:
            raise ConfigError(f"invalid port {port}: must be between 1 and 65535")
        skip = params.get_bool("insecureSkipVerify", True) if "insecureSkipVerify" in params else None
        client_cert = _optional_str(params, "clientCertPath")
        client_key = _optional_str(params, "clientKeyPath")
        if bool(client_cert) != bool(client_key):
            raise ConfigError("clientCertPath and clientKeyPath must be set together")
        interval = _optional_str(params, "interval")
        interval_s: float | None = None
        if interval is not None:
            try:
                interval_s = parse_go_duration(interval)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if interval_s < 0:
                raise ConfigError(f"interval must be non-negative, got {interval}")
        return cls(
            name,
            scheme=scheme,
            path=path,
            port=port,
            insecure_skip_verify=skip,
            ca_cert_path=_optional_str(params, "caCertPath"),
            client_cert_path=client_cert,
            client_key_path=client_key,
            interval_s=interval_s or None,
        )


_ENGINE_FIELDS = (
    "name",
    "queuedRequestsSpec",
    "runningRequestsSpec",
    "kvUsageSpec",
    "loraSpec",
    "cacheInfoSpec",
    "cacheBlockSizeLabelName",
    "cacheNumBlocksLabelName",
    "cacheBlockSizeSpec",
    "cacheNumBlocksSpec",
    "customMetrics",
)
_CUSTOM_FIELDS = ("attributeKey", "metricSpec")


def _strict_entry(entry: Any, fields: Sequence[str], where: str) -> Mapping[str, Any]:
    """A list entry decoded as Go's strict decoder does: a mapping of known fields, strings only."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {entry!r}")
    for key, value in entry.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown parameter {key!r} (allowed: {', '.join(fields)})")
        if key != "customMetrics" and value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return entry


class CoreMetricsExtractor(DataSource):
    """Which series of a model server's metrics page hold the queue, running requests, KV-cache
    usage, LoRA and cache info, per engine (pod label `engineLabelKey`, else `defaultEngine`).
    `engineConfigs` entries replace an engine's built-in mapping; they win over the `*-metric`
    flags."""

    type_name = "core-metrics-extractor"
    parameters = (
        ParamDoc("engineLabelKey", "string", "llm-d.ai/engine-type", "Pod label naming the engine."),
        ParamDoc("defaultEngine", "string", "vllm", "Engine of pods without the label (e.g. sglang)."),
        ParamDoc(
            "engineConfigs",
            "list of mappings",
            "[]",
            "Per engine: name, queuedRequestsSpec, runningRequestsSpec, kvUsageSpec, loraSpec, "
            "cacheInfoSpec, cacheBlockSizeLabelName, cacheNumBlocksLabelName, cacheBlockSizeSpec, "
            "cacheNumBlocksSpec, customMetrics.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        engine_label_key: str | None = None,
        default_engine: str | None = None,
        engine_configs: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(name)
        self.engine_label_key = engine_label_key
        self.default_engine = default_engine
        self.engine_configs = tuple(engine_configs)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        configs: list[Mapping[str, Any]] = []
        custom_given = False
        for i, raw in enumerate(params.get_list("engineConfigs")):
            entry = _strict_entry(raw, _ENGINE_FIELDS, f"engineConfigs[{i}]")
            custom = entry.get("customMetrics") or []
            if not isinstance(custom, list):
                raise ConfigError(f"engineConfigs[{i}].customMetrics must be a list")
            for j, metric in enumerate(custom):
                _strict_entry(metric, _CUSTOM_FIELDS, f"engineConfigs[{i}].customMetrics[{j}]")
            custom_given = custom_given or bool(custom)
            configs.append(entry)
        if custom_given:
            params.warn(
                "customMetrics are checked but not read: no epp plugin reads custom endpoint "
                "attributes (the Go EPP's endpoint-attribute-scorer/-filter)"
            )
        return cls(
            name,
            engine_label_key=_optional_str(params, "engineLabelKey"),
            default_engine=_optional_str(params, "defaultEngine"),
            engine_configs=configs,
        )
