"""The flowControl section: upstream configs, defaults, quantities, bad references."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.flowcontrol.config import DEFAULT_BAND_MAX_REQUESTS, duration_s, quantity
from epp.framework import ConfigError
from epp.framework.registry import installed_registry
from epp.scheduling.loader import load_config

UPSTREAM = Path("/work/shared/upstream/configs")
if not UPSTREAM.is_dir():
    UPSTREAM = Path(__file__).resolve().parents[3] / "shared" / "upstream" / "configs"

BASE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
{extra}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"""


def load(extra: str) -> object:
    return load_config(BASE.format(extra=extra), installed_registry(), "test")


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="upstream configs not present")
def test_upstream_flow_control_guide_loads() -> None:
    loaded = load_config(
        (UPSTREAM / "llm-d_guides_flow-control_router.yaml").read_text(), installed_registry()
    )
    fc = loaded.flow_control
    assert fc is not None and fc.max_requests == 1000 and fc.max_bytes == 10 * 2**30 and fc.ttl_s == 60
    assert {p: b.max_requests for p, b in fc.bands.items()} == {100: 500, 0: 200, -10: 50}
    assert fc.bands[-10].fairness.type_name == "round-robin-fairness-policy"
    assert loaded.saturation_detector is not None
    assert loaded.saturation_detector.type_name == "concurrency-detector"
    # The detector is a filter too; flow control uses it, so it is not reported as unused.
    assert not [w for w in loaded.warnings if "no profile uses it" in w], loaded.warnings


def test_gate_off_means_no_flow_control_but_a_default_detector() -> None:
    loaded = load_config(
        BASE.format(extra="").replace("featureGates: [flowControl]", ""), installed_registry()
    )
    assert loaded.flow_control is None
    assert (
        loaded.saturation_detector is not None
        and loaded.saturation_detector.type_name == "utilization-detector"
    )
    assert "utilization-detector" not in loaded.implicit_plugins


def test_defaults() -> None:
    loaded = load("flowControl:\n  priorityBands:\n  - priority: 5\n    maxRequests: '0'")
    fc = loaded.flow_control  # type: ignore[attr-defined]
    assert fc.ttl_s == 60.0 and fc.max_requests == 0
    assert fc.bands[5].max_requests == DEFAULT_BAND_MAX_REQUESTS  # "0" is the default, as in Go
    assert fc.bands[5].ordering.type_name == "fcfs-ordering-policy"
    assert fc.bands[5].fairness.type_name == "global-strict-fairness-policy"
    assert fc.band_for(-3).max_requests == DEFAULT_BAND_MAX_REQUESTS
    assert loaded.saturation_detector.type_name == "utilization-detector"  # type: ignore[attr-defined]
    # The detector epp adds is flow control's: not a filter no profile uses.
    assert not [w for w in loaded.warnings if "no profile uses it" in w], loaded.warnings  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "flowControl:\n  priorityBands:\n  - priority: 1\n    fairnessPolicyRef: queue-scorer",
            "is not a fairness policy",
        ),
        (
            "flowControl:\n  priorityBands:\n  - priority: 1\n    orderingPolicyRef: nope",
            "undefined plugin 'nope'",
        ),
        ("flowControl:\n  saturationDetector:\n    pluginRef: queue-scorer", "is not a saturation detector"),
        ("flowControl:\n  priorityBands:\n  - priority: 1\n  - priority: 1", "duplicate priority level 1"),
        ("flowControl:\n  maxRequests: lots", "must be a quantity"),
        ("flowControl:\n  defaultRequestTTL: 5 minutes", "must be a duration"),
    ],
)
def test_bad_sections_are_errors(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(extra)


def test_quantities_and_durations() -> None:
    assert quantity("1k", "x") == 1000 and quantity("10Gi", "x") == 10 * 2**30 and quantity(500, "x") == 500
    assert duration_s("1m30s", "x") == 90.0 and duration_s("250ms", "x") == 0.25 and duration_s("0", "x") == 0
    with pytest.raises(ConfigError):
        quantity("-1", "x")


def test_usage_limit_policy_reference() -> None:
    loaded = load(
        "- type: priority-holdback-policy\n  parameters: {minCeiling: 0.5}\n"
        "flowControl:\n  usageLimitPolicyPluginRef: priority-holdback-policy"
    )
    policy = loaded.flow_control.usage_limit  # type: ignore[attr-defined]
    assert policy is not None and policy.type_name == "priority-holdback-policy"
    with pytest.raises(ConfigError, match="is not a usage limit policy"):
        load("flowControl:\n  usageLimitPolicyPluginRef: queue-scorer")
