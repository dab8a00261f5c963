"""EndpointPickerConfig loading: defaults, and errors that name the file, the plugin and the problem."""

from __future__ import annotations

import pytest

from epp.config import DEFAULT_CONFIG, load_config
from epp.framework import ConfigError
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.profile_handlers import SingleProfileHandler
from epp.scheduling.registry import builtin_registry

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def load(text: str):  # type: ignore[no-untyped-def]
    return load_config(text, builtin_registry(), "cfg.yaml")


def test_default_config_is_the_go_epp_default() -> None:
    scheduler = load(DEFAULT_CONFIG).scheduler
    (profile,) = scheduler.profiles.values()
    assert [(type(w.scorer).type_name, w.weight) for w in profile.scorers] == [  # type: ignore[attr-defined]
        ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0),
        ("prefix-cache-scorer", 3.0),
    ]
    assert isinstance(profile.picker, MaxScorePicker)
    assert isinstance(scheduler.handler, SingleProfileHandler)


def test_defaults_weight_one_and_named_plugins_and_legacy_api_warns() -> None:
    text = (
        HEAD.replace("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
        + """
plugins:
- {type: queue-scorer, name: q}
- {type: max-score-picker, name: pick, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: only
  plugins: [{pluginRef: q}, {pluginRef: pick}]
"""
    )
    loaded = load(text)
    profile = loaded.scheduler.profiles["only"]
    assert profile.scorers[0].weight == 1.0
    assert profile.picker.max_endpoints == 2  # type: ignore[attr-defined]
    assert any("deprecated" in w for w in loaded.warnings)


def test_float_weights_and_unimplemented_fields_are_reported() -> None:
    text = (
        HEAD
        + """featureGates: [x]
plugins:
- {type: queue-scorer, extra: 1}
schedulingProfiles:
- {name: p, plugins: [{pluginRef: queue-scorer, weight: 0.5}]}
"""
    )
    loaded = load(text)
    assert loaded.scheduler.profiles["p"].scorers[0].weight == 0.5
    assert any("featureGates" in w for w in loaded.warnings)
    assert any("'extra'" in w for w in loaded.warnings)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "plugins: [{type: no-such-scorer}]\nschedulingProfiles: [{name: p}]",
            "unknown plugin type 'no-such-scorer'",
        ),
        (
            "plugins: [{type: queue-scorer}, {type: queue-scorer}]\nschedulingProfiles: [{name: p}]",
            "duplicate plugin name 'queue-scorer'",
        ),
        (
            "plugins: []\nschedulingProfiles: [{name: p, plugins: [{pluginRef: ghost}]}]",
            "undefined plugin 'ghost'",
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: big}}]\n"
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: prefix-cache-scorer}]}]",
            "plugin 'prefix-cache-scorer': parameter 'blockSizeTokens' must be an integer",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p}]",
            "'queue-scorer' is defined but no profile",
        ),
        (
            "plugins: [{type: queue-scorer}]\n"
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: heavy}]}]",
            "weight must be a number",
        ),
        ("plugins: [{type: queue-scorer}]", "at least one profile"),
        ("schedulingProfiles: [{name: a}, {name: b}]", "profile handler"),
        ("plugins: {type: queue-scorer}\nschedulingProfiles: [{name: p}]", "plugins must be a list"),
    ],
)
def test_errors_name_file_plugin_and_problem(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(HEAD + body)
    assert str(info.value).startswith("cfg.yaml: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", "not valid YAML"),
        ("- 1", "YAML mapping"),
        ("apiVersion: v1\nkind: EndpointPickerConfig", "apiVersion"),
        ("apiVersion: llm-d.ai/v1alpha1\nkind: Pod", "kind"),
    ],
)
def test_document_level_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(text)


def test_check_config_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    good = tmp_path / "good.yaml"
    good.write_text(DEFAULT_CONFIG)
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + "plugins: [{type: nope}]\nschedulingProfiles: [{name: p}]\n")
    ok = subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", "--config-file", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "valid" in ok.stdout
    fail = subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", "--config-file", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fail.returncode == 1 and str(bad) in fail.stderr and "unknown plugin type 'nope'" in fail.stderr
