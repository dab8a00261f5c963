"""The parts of an EndpointPickerConfig beyond plugins and profiles, checked as the Go loader
(llm-d-router `pkg/epp/config/loader`) checks them: apiVersion, missing plugin types (all named at
once, before anything else), feature gates, request parsers, the saturation detector and flow
control, and the data layer that decides how epp scrapes the model servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.datalayer.model_server_metrics import SGLANG, VLLM
from epp.datalayer.scraper import ScrapeConfig
from epp.framework import ConfigError
from epp.framework.registry import installed_registry
from epp.scheduling.loader import LoadedConfig, load_config
from epp_scorers.datasources.metrics import CoreMetricsExtractor, MetricsDataSource
from epp_scorers.filters.prefix_affinity import PrefixCacheAffinityFilter
from epp_scorers.parsers.openai import OpenAIParser

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
SCORER = "plugins: [{type: queue-scorer}]\n"
PROFILE = "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]\n"


def load(text: str) -> LoadedConfig:
    return load_config(text, installed_registry(), "cfg.yaml")


def fails(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert message.startswith("cfg.yaml: ")
    return message


# --- apiVersion and missing types ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["llm-d.ai/v1", "llm-d.ai/v1alpha1"])
def test_current_api_versions_load_without_a_warning(version: str) -> None:
    loaded = load(f"apiVersion: {version}\nkind: EndpointPickerConfig\n" + SCORER + PROFILE)
    assert loaded.warnings == []


def test_every_missing_type_is_named_in_one_message_before_any_other_error() -> None:
    # A bad apiVersion, a bad parameter and a dangling reference too: the missing types come first.
    message = fails(
        "apiVersion: llm-d.ai/v9\nkind: EndpointPickerConfig\n"
        "plugins:\n- type: uds-tokenizer\n- {type: queue-scorer, parameters: {nope: 1}}\n"
        "- type: data-parallel-profile-handler\n- {type: uds-tokenizer, name: second-tokenizer}\n"
        "requestHandler: {parsers: [{pluginRef: passthrough-parser}]}\n"
        "flowControl: {saturationDetector: {pluginRef: utilization-detector}}\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: ghost}]}]\n"
    )
    assert message == (
        "cfg.yaml: plugin types epp does not have: uds-tokenizer, data-parallel-profile-handler, "
        "passthrough-parser (docs/plugins.md lists the types epp has)"
    )


def test_a_misspelt_type_gets_a_suggestion() -> None:
    assert "quue-scorer (did you mean queue-scorer?)" in fails(HEAD + "plugins: [{type: quue-scorer}]\n")


# --- feature gates -----------------------------------------------------------------------------


def test_feature_gates_as_go_parses_them() -> None:
    loaded = load(HEAD + "featureGates: [prepareDataPlugins, flowControl=FALSE]\n" + SCORER + PROFILE)
    assert any(
        "feature gate 'prepareDataPlugins' is not one the Go EPP registers" in w for w in loaded.warnings
    )
    assert not any("flow control is not implemented" in w for w in loaded.warnings)  # gate off
    assert "not a valid value for the feature gate flowControl" in fails(
        HEAD + "featureGates: [flowControl=maybe]\n" + SCORER
    )
    assert "featureGates must be a list of strings" in fails(HEAD + "featureGates: flowControl\n" + SCORER)


# --- request parsers -----------------------------------------------------------------------------


def test_parsers_must_name_parser_plugins() -> None:
    ok = load(HEAD + SCORER + PROFILE + "requestHandler: {parsers: [{pluginRef: openai-parser}]}\n")
    # Named but not declared: the loader adds it, as Go's does.
    assert ok.implicit_plugins[-1] == "openai-parser"
    assert any(isinstance(p, OpenAIParser) for p in ok.scheduler.plugins)
    assert ok.warnings == []
    cases = {
        "requestHandler: {parsers: [{pluginRef: mine}]}": (
            "requestHandler.parsers references undefined plugin 'mine'"
        ),
        "requestHandler: {parsers: [{pluginRef: queue-scorer}]}": (
            "requestHandler.parsers: plugin 'queue-scorer' (queue-scorer) is not a parser plugin"
        ),
        "requestHandler: {parsers: [{ref: x}]}": "requestHandler.parsers[0]: unknown field 'ref'",
        "requestHandler: {parsers: [{}]}": "requestHandler.parsers[0] needs a 'pluginRef' string",
        "requestHandler: {parser: [{pluginRef: x}]}": "requestHandler: unknown field 'parser'",
        "parser: {pluginRef: queue-scorer}": (
            "parser: plugin 'queue-scorer' (queue-scorer) is not a parser plugin"
        ),
    }
    for body, message in cases.items():
        assert message in fails(HEAD + SCORER + PROFILE + body + "\n"), body


def test_the_deprecated_top_level_parser_is_used_with_a_warning() -> None:
    loaded = load(
        HEAD
        + "plugins: [{type: queue-scorer}, {type: vllmhttp-parser, name: vllm}]\n"
        + PROFILE
        + "parser: {pluginRef: vllm}\n"
    )
    text = "\n".join(loaded.warnings)
    assert "top-level 'parser' is deprecated; use requestHandler.parsers" in text
    assert "plugin 'vllm' (vllmhttp-parser): parsed by epp itself" in text


def test_a_parser_that_changes_the_wire_format_is_a_missing_type() -> None:
    # vllmgrpc-parser (vLLM's gRPC API) and passthrough-parser (any payload) are not accepted.
    for parser in ("vllmgrpc-parser", "passthrough-parser"):
        message = fails(HEAD + SCORER + PROFILE + f"requestHandler: {{parsers: [{{pluginRef: {parser}}}]}}\n")
        assert f"plugin types epp does not have: {parser} " in message


# --- saturation detector and flow control ---------------------------------------------------------


def test_saturation_detector_references() -> None:
    body = HEAD + SCORER + PROFILE
    assert "flowControl.saturationDetector references undefined plugin 'mine'" in fails(
        body + "flowControl: {saturationDetector: {pluginRef: mine}}\n"
    )
    assert (
        "flowControl.saturationDetector: plugin 'queue-scorer' (queue-scorer) is not a saturation detector"
        in fails(body + "flowControl: {saturationDetector: {pluginRef: queue-scorer}}\n")
    )
    assert "saturationDetector references undefined plugin 'x'" in fails(
        body + "saturationDetector: {pluginRef: x}\n"
    )
    # An empty reference is Go's default detector.
    loaded = load(body + "saturationDetector: {}\n")
    assert any("top-level 'saturationDetector' is deprecated" in w for w in loaded.warnings)


@pytest.mark.parametrize("gate", ["", "featureGates: [flowControl]\n"])
@pytest.mark.parametrize(
    "reference",
    [
        "flowControl: {saturationDetector: {pluginRef: utilization-detector}}\n",
        "saturationDetector: {pluginRef: utilization-detector}\n",
    ],
)
def test_the_default_detector_named_and_not_declared_is_added_as_go_adds_it(
    gate: str, reference: str
) -> None:
    loaded = load(HEAD + gate + SCORER + PROFILE + reference)
    assert "utilization-detector" in loaded.implicit_plugins
    assert loaded.saturation_detector is not None
    assert loaded.saturation_detector.type_name == "utilization-detector"


def test_flow_control_policies_are_checked_when_the_gate_is_on() -> None:
    band = "flowControl: {priorityBands: [{priority: 1, fairnessPolicyRef: mine}]}\n"
    # Gate off: Go ignores the settings, and warns.
    off = load(HEAD + SCORER + PROFILE + band)
    assert any("the flowControl feature gate is disabled" in w for w in off.warnings)
    on = HEAD + "featureGates: [flowControl]\n" + SCORER + PROFILE
    assert "flowControl.priorityBands[0].fairnessPolicyRef references undefined plugin 'mine'" in fails(
        on + band
    )
    assert (
        "flowControl.usageLimitPolicyPluginRef: plugin 'queue-scorer' (queue-scorer) is not a usage "
        "limit policy" in fails(on + "flowControl: {usageLimitPolicyPluginRef: queue-scorer}\n")
    )
    # Go's default policies, named and not declared, are added, as Go adds them.
    usage = load(on + "flowControl: {usageLimitPolicyPluginRef: static-usage-limit-policy}\n")
    assert "static-usage-limit-policy" in usage.implicit_plugins
    added = load(on + "flowControl: {defaultPriorityBand: {orderingPolicyRef: fcfs-ordering-policy}}\n")
    assert "fcfs-ordering-policy" in added.implicit_plugins


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        ("{maxBytes: lots}", "flowControl.maxBytes must be a quantity"),
        ("{defaultRequestTTL: 60}", "flowControl.defaultRequestTTL must be a duration"),
        ("{priorityBands: [{priority: high}]}", "flowControl.priorityBands[0].priority must be an integer"),
        (
            "{priorityBands: [{priority: 1, weight: 2}]}",
            "flowControl.priorityBands[0]: unknown field 'weight'",
        ),
        ("{maxConcurrency: 3}", "flowControl: unknown field 'maxConcurrency'"),
        ("{enableEviction: yes please}", "flowControl.enableEviction must be true or false"),
    ],
)
def test_flow_control_shapes(flow: str, message: str) -> None:
    assert message in fails(HEAD + SCORER + PROFILE + f"flowControl: {flow}\n")


# --- data layer -----------------------------------------------------------------------------------


def test_without_a_data_layer_the_plugins_named_after_their_types_are_used() -> None:
    loaded = load(
        HEAD + PROFILE + "plugins:\n- type: queue-scorer\n"
        "- {type: metrics-data-source, parameters: {scheme: http, path: /prometheus/metrics, port: 9400}}\n"
        "- {type: core-metrics-extractor, parameters: {defaultEngine: sglang}}\n"
    )
    source, extractor = loaded.data_layer.source, loaded.data_layer.extractor
    assert isinstance(source, MetricsDataSource) and isinstance(extractor, CoreMetricsExtractor)
    config = ScrapeConfig().with_source(source, extractor)
    assert (config.path, config.port, config.engines.for_labels({})) == ("/prometheus/metrics", 9400, SGLANG)
    assert loaded.warnings == []


def test_the_data_layer_wires_named_sources_and_extractors() -> None:
    loaded = load(
        HEAD + PROFILE + "plugins:\n- type: queue-scorer\n"
        "- {type: metrics-data-source, name: trt, parameters: {path: /prometheus/metrics}}\n"
        "- {type: core-metrics-extractor, name: trt-names, parameters: {defaultEngine: trtllm-serve}}\n"
        "- {type: core-metrics-extractor, name: unused}\n"
        "dataLayer: {sources: [{pluginRef: trt, extractors: [{pluginRef: trt-names}]}]}\n"
    )
    assert loaded.data_layer.source is not None and loaded.data_layer.source.path == "/prometheus/metrics"
    assert (
        loaded.data_layer.extractor is not None
        and loaded.data_layer.extractor.default_engine == "trtllm-serve"
    )
    # Go also adds its default metrics source (no source is named metrics-data-source): one page per
    # endpoint in epp, so it says which it uses; and an extractor nothing wires is reported.
    text = "\n".join(loaded.warnings)
    assert "it uses 'trt' and ignores 'metrics-data-source'" in text
    assert "plugin 'unused' (core-metrics-extractor) is not in the data layer" in text


def test_inject_defaults_false_without_a_metrics_source_is_reported() -> None:
    loaded = load(HEAD + SCORER + PROFILE + "dataLayer: {injectDefaults: false}\n")
    assert loaded.data_layer.source is None
    assert any("the Go EPP would collect no metrics" in w for w in loaded.warnings)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "dataLayer: {sources: [{pluginRef: ghost}]}",
            "dataLayer.sources[0] references undefined plugin 'ghost'",
        ),
        (
            "dataLayer: {sources: [{pluginRef: queue-scorer}]}",
            "dataLayer.sources[0]: plugin 'queue-scorer' (queue-scorer) is not a data source",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: metrics-data-source}]\n"
            "dataLayer: {sources: [{pluginRef: metrics-data-source,"
            " extractors: [{pluginRef: queue-scorer}]}]}",
            "plugin 'queue-scorer' (queue-scorer) cannot extract the metrics of plugin 'metrics-data-source'",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: metrics-data-source}]\n"
            "dataLayer: {sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: x}]}]}",
            "dataLayer.sources[0].extractors[0] references undefined plugin 'x'",
        ),
        (
            "dataLayer: {discovery: {pluginRef: files}}",
            "dataLayer.discovery references undefined plugin 'files'",
        ),
        (
            "dataLayer: {crossReplicaSyncerPluginRef: queue-scorer}",
            "plugin 'queue-scorer' (queue-scorer) is not a cross-replica syncer plugin",
        ),
        ("dataLayer: {sources: [], extra: 1}", "dataLayer: unknown field 'extra'"),
        (
            "plugins: [{type: queue-scorer}, {type: kv-cache-utilization-scorer, name: metrics-data-source}]",
            "plugin 'metrics-data-source' (kv-cache-utilization-scorer) takes the name of the default",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: metrics-data-source, parameters: {scheme: ftp}}]",
            "unsupported scheme: 'ftp'",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: metrics-data-source, parameters: {port: 70000}}]",
            "invalid port 70000",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: metrics-data-source, parameters: {interval: soon}}]",
            "invalid duration 'soon'",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: metrics-data-source, parameters: {scheme: https,"
            " insecureSkipVerify: false, caCertPath: /nonexistent/ca.pem}}]",
            "plugin 'metrics-data-source' (metrics-data-source): cannot load the scrape TLS files",
        ),
        (
            "plugins: [{type: queue-scorer},"
            " {type: core-metrics-extractor, parameters: {defaultEngine: tgi}}]",
            "plugin 'core-metrics-extractor' (core-metrics-extractor): defaultEngine 'tgi' not found",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: core-metrics-extractor, parameters: {engineConfigs:"
            " [{name: tgi, queuedRequestsSpec: 'tgi_queue{'}]}}]",
            "engine 'tgi': queuedRequestsSpec: not a valid metric specification: 'tgi_queue{'",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: core-metrics-extractor, parameters: {engineConfigs:"
            " [{name: tgi, queueSpec: q}]}}]",
            "engineConfigs[0]: unknown parameter 'queueSpec'",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: core-metrics-extractor, parameters: {engineConfigs:"
            " [{name: default}]}}]",
            "engine config name cannot be 'default' (reserved)",
        ),
    ],
)
def test_data_layer_errors(body: str, message: str) -> None:
    plugins = "" if body.startswith("plugins:") else SCORER
    assert message in fails(HEAD + PROFILE + plugins + body + "\n")


def test_custom_metrics_are_checked_then_reported_as_unread() -> None:
    loaded = load(
        HEAD + PROFILE + "plugins:\n- type: queue-scorer\n- type: core-metrics-extractor\n"
        "  parameters:\n    engineConfigs:\n    - name: vllm\n"
        "      queuedRequestsSpec: vllm:num_requests_waiting\n"
        "      customMetrics: [{attributeKey: depth, metricSpec: 'q{tier=gold}'}]\n"
    )
    assert any("customMetrics are checked but not read" in w for w in loaded.warnings)
    assert "engine 'vllm': custom metric attributeKey 'depth' is duplicated" in fails(
        HEAD + PROFILE + "plugins:\n- type: queue-scorer\n- type: core-metrics-extractor\n"
        "  parameters:\n    engineConfigs:\n    - name: vllm\n"
        "      customMetrics: [{attributeKey: depth, metricSpec: q}, {attributeKey: depth, metricSpec: r}]\n"
    )


def test_the_default_data_layer_reads_vllm() -> None:
    loaded = load(HEAD + SCORER + PROFILE)
    assert loaded.data_layer.source is None and loaded.data_layer.extractor is None
    assert ScrapeConfig().with_source(None).engines.for_labels({}) is VLLM


# --- a parameter upstream removed and its guide still sets ----------------------------------------


AFFINITY = (
    HEAD
    + "plugins:\n- type: token-load-scorer\n- type: prefix-cache-affinity-filter\n  parameters: {params}\n"
)


def affinity_of(loaded: LoadedConfig) -> PrefixCacheAffinityFilter:
    (plugin,) = [p for p in loaded.scheduler.plugins if isinstance(p, PrefixCacheAffinityFilter)]
    return plugin


def test_max_tokens_in_flight_penalty_becomes_the_current_ttft_gate() -> None:
    loaded = load(AFFINITY.format(params="{maxTokensInFlightPenalty: 10000, peakPrefillThroughput: 5000}"))
    assert affinity_of(loaded).max_penalty_ms == 2000.0  # 10,000 tokens at 5,000 tokens/s
    assert any(
        "maxTTFTPenaltyMs 2000 = 10000 tokens / peakPrefillThroughput 5000" in w for w in loaded.warnings
    )
    # 0 disabled it: the filter keeps the current defaults.
    zero = load(AFFINITY.format(params="{maxTokensInFlightPenalty: 0}"))
    assert affinity_of(zero).max_penalty_ms == 18000.0
    assert "maxTokensInFlightPenalty must be an integer >= 0" in fails(
        AFFINITY.format(params="{maxTokensInFlightPenalty: -1}")
    )


def test_the_example_configs_load(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2] / "examples" / "configs"
    for path in root.glob("*.yaml"):
        load_config(path.read_text(), installed_registry(), str(path))
