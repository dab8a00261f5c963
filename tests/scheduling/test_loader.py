"""EndpointPickerConfig loading: the Go loader's defaults, and errors that name the file, the plugin
and the problem."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pytest

from epp.framework import ConfigError, CycleState, DataKey, Endpoint, InferenceRequest, Scorer
from epp.framework.registry import installed_registry
from epp.scheduling.loader import DEFAULT_CONFIG, LoadedConfig, load_config
from epp_scorers.filters.roles import DecodeFilter
from epp_scorers.pickers.max_score import MaxScorePicker
from epp_scorers.pickers.uniform_random import RandomPicker
from epp_scorers.producers.approx_prefix import ApproxPrefixCacheProducer
from epp_scorers.producers.inflight import InFlightLoadProducer
from epp_scorers.profile_handlers.single import SingleProfileHandler
from epp_scorers.scorers.prefix_cache import PrefixCacheScorer

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def load(text: str) -> LoadedConfig:
    return load_config(text, installed_registry(), "cfg.yaml")


def types_of(loaded: LoadedConfig, profile: str) -> list[tuple[str, float]]:
    p = loaded.scheduler.profiles[profile]
    return [(w.scorer.type_name, w.weight) for w in p.scorers]


def test_default_config_is_the_go_epp_default() -> None:
    loaded = load(DEFAULT_CONFIG)
    scheduler = loaded.scheduler
    assert types_of(loaded, "default") == [
        ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0),
        ("prefix-cache-scorer", 3.0),
    ]
    assert isinstance(scheduler.profiles["default"].picker, MaxScorePicker)
    assert isinstance(scheduler.handler, SingleProfileHandler)
    # The prefix scorer's data comes from the producer the loader adds, as the Go EPP does.
    assert loaded.implicit_plugins == [
        "approx-prefix-cache-producer",
        "max-score-picker",
        "single-profile-handler",
    ]
    assert [type(p) for p in scheduler.producers] == [ApproxPrefixCacheProducer]
    assert loaded.warnings == []


def test_defaults_weight_one_named_plugins_and_legacy_api_warns() -> None:
    text = HEAD.replace("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1") + (
        "plugins:\n"
        "- {type: queue-scorer, name: q}\n"
        "- {type: max-score-picker, name: pick, parameters: {maxNumOfEndpoints: 2}}\n"
        "schedulingProfiles:\n"
        "- name: only\n"
        "  plugins: [{pluginRef: q}, {pluginRef: pick}]\n"
    )
    loaded = load(text)
    profile = loaded.scheduler.profiles["only"]
    assert profile.scorers[0].weight == 1.0
    assert profile.picker.max_endpoints == 2  # type: ignore[attr-defined]
    assert any("deprecated" in w and "llm-d.ai/v1alpha1" in w for w in loaded.warnings)


@pytest.mark.parametrize(
    ("weight", "expected"),
    [("2", 2.0), ("0.5", 0.5), ("1e-1", 0.1), ("-1", -1.0), ("0", 0.0), ("~", 1.0)],
)
def test_weights_integers_floats_and_missing(weight: str, expected: float) -> None:
    loaded = load(
        HEAD + "plugins: [{type: queue-scorer}]\n"
        f"schedulingProfiles: [{{name: p, plugins: [{{pluginRef: queue-scorer, weight: {weight}}}]}}]\n"
    )
    assert types_of(loaded, "p") == [("queue-scorer", expected)]


def test_no_profiles_gives_one_default_profile_with_every_filter_scorer_and_picker() -> None:
    loaded = load(
        HEAD + "plugins:\n- type: decode-filter\n- type: queue-scorer\n- type: lora-affinity-scorer\n"
        "- type: random-picker\n- type: inflight-load-producer\n"
    )
    (name,) = loaded.scheduler.profiles
    profile = loaded.scheduler.profiles[name]
    assert name == "default"
    assert [type(f) for f in profile.filters] == [DecodeFilter]
    assert types_of(loaded, "default") == [("queue-scorer", 1.0), ("lora-affinity-scorer", 1.0)]
    assert isinstance(profile.picker, RandomPicker)


def test_a_profile_without_picker_reuses_the_declared_picker() -> None:
    loaded = load(
        HEAD + "plugins: [{type: queue-scorer}, {type: random-picker, parameters: {maxNumOfEndpoints: 3}}]\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]\n"
    )
    picker = loaded.scheduler.profiles["p"].picker
    assert isinstance(picker, RandomPicker) and picker.max_endpoints == 3
    assert not any("picker" in w for w in loaded.warnings)


def test_go_settings_epp_does_not_implement_are_reported() -> None:
    loaded = load(
        HEAD + "featureGates: [flowControl]\n"
        "flowControl: {maxRequests: 1k, defaultRequestTTL: 60s, enableEviction: true}\n"
        "dataLayer: {crossReplicaSyncInterval: 5s}\n"
        "requestHandler: {parsers: [{pluginRef: openai-parser}]}\n"
        "plugins: [{type: queue-scorer}, {type: openai-parser, parameters: {strict: true}}]\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]\n"
    )
    text = "\n".join(loaded.warnings)
    assert "flowControl.enableEviction is not implemented by epp and is ignored" in text
    assert loaded.flow_control is not None and loaded.flow_control.max_requests == 1000
    assert "crossReplicaSyncInterval is not implemented by epp" in text
    assert (
        "plugin 'openai-parser' (openai-parser): epp parses the OpenAI API itself; its parameters strict"
        in text
    )
    assert all(w.startswith("cfg.yaml: ") for w in loaded.warnings)


@pytest.mark.parametrize(
    ("plugin", "warning"),
    [
        ("{type: by-label, parameters: {label: a, validValues: [b]}}", "type 'by-label' is deprecated"),
        ("{type: by-label-selector, parameters: {matchLabels: {a: b}}}", "use label-selector-filter"),
        (
            "{type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}",
            "maxNumOfEndpoints 0 is not positive",
        ),
        ("{type: active-request-scorer, parameters: {requestTimeout: 2m}}", "'requestTimeout' is deprecated"),
        ("{type: active-request-scorer, parameters: {maxBusyScore: 3}}", "maxBusyScore 3.0 is outside"),
        ("{type: load-aware-scorer, parameters: {threshold: 0}}", "threshold 0 is not positive"),
        ("{type: no-hit-lru-scorer, parameters: {prefixPluginName: p}}", "'prefixPluginName' is not impl"),
        ("{type: inflight-load-producer, parameters: {syncCrossReplicaState: true}}", "one replica"),
        ("{type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 16}}", "below the minimum 64"),
        ("{type: approx-prefix-cache-producer, parameters: {blockSize: 128}}", "'blockSize' is deprecated"),
    ],
)
def test_plugin_warnings(plugin: str, warning: str) -> None:
    loaded = load(HEAD + f"plugins: [{plugin}]\n")
    assert any(warning in w for w in loaded.warnings), loaded.warnings


def test_legacy_prefix_parameters_on_the_scorer_configure_the_implicit_producer() -> None:
    loaded = load(
        HEAD + "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 128, autoTune: false,"
        " maxPrefixBlocksToMatch: 100, maxPrefixTokensToMatch: 0, lruCapacityPerServer: 500}\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: prefix-cache-scorer}]}]\n"
    )
    (producer,) = loaded.scheduler.producers
    assert isinstance(producer, ApproxPrefixCacheProducer)
    assert (producer.block_size_tokens, producer.auto_tune, producer.max_blocks, producer.max_tokens) == (
        128,
        False,
        100,
        0,
    )
    assert producer.lru_capacity == 500
    assert any("older config layout" in w for w in loaded.warnings)


def test_legacy_prefix_parameters_are_ignored_when_a_producer_is_declared() -> None:
    loaded = load(
        HEAD + "plugins:\n- type: approx-prefix-cache-producer\n"
        "- {type: prefix-cache-scorer, parameters: {lruCapacityPerServer: 5}}\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: prefix-cache-scorer}]}]\n"
    )
    (producer,) = loaded.scheduler.producers
    assert producer.lru_capacity == 31_250  # type: ignore[attr-defined]
    assert any(
        "parameters lruCapacityPerServer belong to the producer of "
        "'prefix-cache-match/approx-prefix-cache-producer', which the config declares; they are ignored here"
        in w
        for w in loaded.warnings
    ), loaded.warnings


def test_named_producers_bind_by_name_and_default_ones_are_added_once() -> None:
    loaded = load(
        HEAD
        + "plugins:\n- {type: approx-prefix-cache-producer, name: gpu, parameters: {blockSizeTokens: 64}}\n"
        "- {type: prefix-cache-scorer, name: gpu-prefix, parameters: {prefixMatchInfoProducerName: gpu}}\n"
        "- type: no-hit-lru-scorer\n- type: active-request-scorer\n- type: token-load-scorer\n"
    )
    names = [p.name for p in loaded.scheduler.producers]
    # gpu serves the named scorer; the LRU scorer wants the default producer, which is added;
    # token-load-scorer gets one inflight-load-producer. active-request-scorer reads the in-flight
    # ledger (Endpoint.inflight_requests) and consumes nothing.
    assert names == ["gpu", "approx-prefix-cache-producer", "inflight-load-producer"]
    assert loaded.implicit_plugins.count("approx-prefix-cache-producer") == 1
    assert loaded.implicit_plugins.count("inflight-load-producer") == 1
    assert isinstance(loaded.scheduler.producers[2], InFlightLoadProducer)
    scorers = {w.scorer.type_name: w.scorer for w in loaded.scheduler.profiles["default"].scorers}
    assert list(scorers["active-request-scorer"].consumes()) == []
    assert [str(k) for k in scorers["token-load-scorer"].consumes()] == [
        "inflight-load/inflight-load-producer"
    ]
    scorer = loaded.scheduler.profiles["default"].scorers[0].scorer
    assert isinstance(scorer, PrefixCacheScorer)
    assert [str(k) for k in scorer.consumes()] == ["prefix-cache-match/gpu"]


def test_a_plugin_listed_in_a_profile_that_is_not_a_scheduling_plugin_is_reported() -> None:
    loaded = load(
        HEAD + "plugins: [{type: inflight-load-producer}, {type: queue-scorer}, {type: decode-filter}]\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: inflight-load-producer, weight: 2},"
        " {pluginRef: queue-scorer}]}]\n"
    )
    text = "\n".join(loaded.warnings)
    assert "'inflight-load-producer' (inflight-load-producer) is not a filter, scorer or picker" in text
    assert "'inflight-load-producer' is not a scorer; its weight is ignored" in text
    assert "'decode-filter' is a filter but no profile uses it" in text


P = "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("plugins: [{type: no-such-scorer}]", "plugin types epp does not have: no-such-scorer"),
        (
            "plugins: [{type: queue-scorer}, {type: queue-scorer}]\n" + P,
            "duplicate plugin name 'queue-scorer'",
        ),
        (
            "plugins: [{type: queue-scorer, name: a}, {type: kv-cache-utilization-scorer, name: a}]",
            "duplicate plugin name 'a'",
        ),
        (
            "plugins: []\nschedulingProfiles: [{name: p, plugins: [{pluginRef: ghost}]}]",
            "undefined plugin 'ghost'",
        ),
        (
            "plugins: [{type: load-aware-scorer, parameters: {threshold: big}}]",
            "plugin 'load-aware-scorer' (load-aware-scorer): parameter 'threshold' must be an integer, got"
            " 'big'",
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: big}}]",
            "plugin 'prefix-cache-scorer' (parameters for the approx-prefix-cache-producer it needs): "
            "parameter 'blockSizeTokens' must be an integer",
        ),
        (
            "plugins: [{type: queue-scorer, parameters: {threshold: 3}}]",
            "plugin 'queue-scorer' (queue-scorer): unknown parameter 'threshold'",
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {matchLenghtWeight: 0.5}}]",
            "unknown parameter 'matchLenghtWeight'",
        ),
        (
            "plugins: [{type: session-affinity-scorer, parameters: {encodedEndpointHeaderConfig: {hedaer:"
            " x}}}]",
            "unknown parameter 'encodedEndpointHeaderConfig.hedaer'",
        ),
        ("plugins: [{type: queue-scorer, parameters: [1]}]", "parameters must be a mapping"),
        (
            "plugins: [{type: queue-scorer}]\n"
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: heavy}]}]",
            "plugin 'queue-scorer': weight must be a number, got 'heavy'",
        ),
        (
            "plugins: [{type: queue-scorer}]\n"
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: .nan}]}]",
            "weight must be a number",
        ),
        ("schedulingProfiles: [{name: a}, {name: b}]", "2 profiles need a profile handler"),
        (
            "plugins: [{type: single-profile-handler}]\nschedulingProfiles: [{name: a}, {name: b}]",
            "single-profile-handler) cannot run 2 profiles",
        ),
        (
            "plugins: [{type: single-profile-handler, name: a}, {type: single-profile-handler, name: b}]",
            "more than one profile handler",
        ),
        (
            "plugins: [{type: random-picker}, {type: max-score-picker}]\n"
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: random-picker}, {pluginRef:"
            " max-score-picker}]}]",
            "profile 'p' has more than one picker",
        ),
        ("plugins: {type: queue-scorer}", "plugins must be a list"),
        ("plugins: [{name: x}]", "plugins[0] needs a 'type' string"),
        ("plugins: [{type: queue-scorer, weight: 2}]\n" + P, "plugin 'queue-scorer': unknown field 'weight'"),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, filters: []}]",
            "unknown field 'filters'",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef:"
            " queue-scorer,"
            " wieght: 2}]}]",
            "plugin 'queue-scorer': unknown field 'wieght'",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef:"
            " queue-scorer},"
            " {pluginRef: queue-scorer}]}]",
            "lists plugin 'queue-scorer' twice",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{plugins: []}]",
            "schedulingProfiles[0] needs a",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p}, {name: p}]",
            "duplicate profile name",
        ),
        (
            "plugins: [{type: queue-scorer, name: approx-prefix-cache-producer},"
            " {type: prefix-cache-scorer}]",
            "that name is taken by a plugin of type 'queue-scorer'",
        ),
        (
            "plugins: [{type: label-selector-filter, parameters: {matchLabels: {a: 1}}}]",
            "value must be a string",
        ),
        (
            "plugins: [{type: prefix-cache-affinity-filter, parameters: {ttftSource: sidecar}}]",
            "'ttftSource' must be one of 'prefillThroughput', 'latencyPredictor', got 'sidecar'",
        ),
        ("plugins: [{type: session-affinity-scorer, parameters: {strategy: cookie}}]", "must be one of"),
        ("schedulingprofiles: []", "unknown field 'schedulingprofiles'"),
    ],
)
def test_errors_name_file_plugin_and_problem(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(HEAD + body)
    assert str(info.value).startswith("cfg.yaml: ")
    assert message in str(info.value)


def test_a_scorer_no_profile_uses_loads_with_a_warning_as_in_go() -> None:
    loaded = load(HEAD + "plugins: [{type: queue-scorer}, {type: lora-affinity-scorer}]\n" + P)
    assert types_of(loaded, "p") == [("queue-scorer", 1.0)]
    assert any(
        "'lora-affinity-scorer' (lora-affinity-scorer) is a scorer but no profile uses it, so it does nothing"
        in w
        for w in loaded.warnings
    ), loaded.warnings


def test_a_consumer_without_any_producer_is_an_error() -> None:
    class NeedsData(Scorer):
        type_name = "needs-data"

        def consumes(self) -> Collection[DataKey[Any]]:
            return (DataKey("weather", "oracle"),)

        def score(
            self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
        ) -> Sequence[float]:
            return [0.0] * len(endpoints)

    registry = installed_registry()
    registry.register(NeedsData)
    with pytest.raises(ConfigError, match="plugin 'needs-data' needs data 'weather/oracle', which no"):
        load_config(HEAD + "plugins: [{type: needs-data}]\n", registry, "cfg.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", "not valid YAML"),
        ("- 1", "YAML mapping"),
        ("apiVersion: v1\nkind: EndpointPickerConfig", "apiVersion must be llm-d.ai/v1alpha1 or llm-d.ai/v1"),
        ("apiVersion: llm-d.ai/v1alpha1\nkind: Pod", "kind must be EndpointPickerConfig"),
        # Go's strict decoder rejects a repeated key; PyYAML alone would keep the last one.
        (HEAD + "plugins: []\nplugins: [{type: queue-scorer}]", "key 'plugins' is given twice"),
        (HEAD + "plugins: [{type: queue-scorer, type: kv-cache-utilization-scorer}]", "key 'type' is given"),
    ],
)
def test_document_level_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(text)


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        DEFAULT_CONFIG.replace("schedulingProfiles:", "featureGates: [nope]\nschedulingProfiles:")
    )
    ok = run_check(good)
    assert ok.returncode == 0 and "valid" in ok.stdout
    assert "warning" in ok.stderr and "feature gate 'nope' is not one the Go EPP registers" in ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + "plugins: [{type: nope}]\n")
    fail = run_check(bad)
    assert fail.returncode == 1
    assert str(bad) in fail.stderr and "plugin types epp does not have: nope" in fail.stderr
    missing = run_check(tmp_path / "missing.yaml")
    assert missing.returncode == 1 and "cannot read" in missing.stderr
