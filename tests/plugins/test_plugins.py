"""The plugin set as a whole: registry and entry points, a config using every plugin type, pickers,
the example third-party scorer, lifecycle hooks, and the observability of decisions."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

import epp.framework.registry as registry_module
import epp_scorers
from epp.datalayer.datastore import Datastore
from epp.errors import ConfigError, EppError
from epp.framework import (
    ROLE_LABEL,
    CycleState,
    Endpoint,
    InferenceRequest,
    Params,
    PluginRegistry,
    PreRequest,
    ResponseComplete,
    SchedulingResult,
    Scorer,
)
from epp.framework.registry import installed_registry
from epp.observability import EppMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.loader import DEFAULT_CONFIG, load_config
from epp.testing import complete, load_scheduler, make_endpoint, make_request, route, run_profile, score
from epp_scorers.filters.prefix_affinity import PrefixCacheAffinityFilter
from epp_scorers.filters.roles import DecodeFilter
from epp_scorers.pickers.base import BasePicker
from epp_scorers.pickers.max_score import MaxScorePicker
from epp_scorers.pickers.uniform_random import RandomPicker
from epp_scorers.pickers.weighted_random import WeightedRandomPicker
from epp_scorers.producers.approx_prefix import ApproxPrefixCacheProducer
from epp_scorers.scorers.kv_cache import KvCacheUtilizationScorer
from epp_scorers.scorers.queue import QueueScorer
from tests.support.epp_app import running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, exchange
from tests.support.fake_vllm import FakeVllm

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = ROOT / "examples" / "epp-example-scorer" / "kv-headroom.yaml"
REALISTIC_CONFIG = ROOT / "examples" / "configs" / "llm-d-realistic.yaml"

# The plugin types of the issue, and the extra Go types epp also accepts.
PLUGIN_TYPES = {
    "queue-scorer",
    "running-requests-size-scorer",
    "kv-cache-utilization-scorer",
    "load-aware-scorer",
    "active-request-scorer",
    "token-load-scorer",
    "lora-affinity-scorer",
    "session-affinity-scorer",
    "prefix-cache-scorer",
    "no-hit-lru-scorer",
    "approx-prefix-cache-producer",
    "inflight-load-producer",
    "label-selector-filter",
    "decode-filter",
    "prefill-filter",
    "encode-filter",
    "prefix-cache-affinity-filter",
    "by-label",
    "by-label-selector",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "metrics-data-source",
    "core-metrics-extractor",
    "openai-parser",
    "vllmhttp-parser",
}
# P/D: a config has one profile handler, so these are covered by tests/test_pd.py.
PD_PLUGIN_TYPES = {
    "disagg-profile-handler",
    "pd-profile-handler",
    "prefix-based-pd-decider",
    "always-disagg-pd-decider",
    "disagg-headers-handler",
    "prefill-header-handler",
}
# KV events (precise prefix-cache routing): they start event subscribers, so
# tests/plugins/kvcache covers them.
KV_PLUGIN_TYPES = {
    "tokenizer",
    "token-producer",
    "precise-prefix-cache-producer",
    "precise-prefix-cache-scorer",
    "endpoint-notification-source",
}

# Flow control and admission (saturation detectors, policies, admitters): not scheduling-profile
# plugins, so tests/plugins/flowcontrol and tests/flowcontrol cover them.
FLOW_CONTROL_PLUGIN_TYPES = {
    "utilization-detector",
    "concurrency-detector",
    "fcfs-ordering-policy",
    "edf-ordering-policy",
    "slo-deadline-ordering-policy",
    "global-strict-fairness-policy",
    "round-robin-fairness-policy",
    "program-aware-fairness",
    "static-usage-limit-policy",
    "priority-holdback-policy",
    "soft-reflective-ceiling-policy",
    "probabilistic-admitter",
}

# Predicted-latency routing: tests/plugins/test_predicted_latency.py covers them.
LATENCY_PLUGIN_TYPES = {
    "predicted-latency-producer",
    "latency-scorer",
    "slo-headroom-tier-filter",
    "latency-slo-admitter",
}


def in_tree_registry() -> PluginRegistry:
    """The in-tree plugins only (what epp_scorers' entry point registers), without third-party ones."""
    registry = PluginRegistry()
    epp_scorers.register(registry)
    return registry


def test_in_tree_registry_has_every_plugin_type() -> None:
    assert set(in_tree_registry().types()) == (
        PLUGIN_TYPES | PD_PLUGIN_TYPES | KV_PLUGIN_TYPES | FLOW_CONTROL_PLUGIN_TYPES | LATENCY_PLUGIN_TYPES
    )
    # epp itself finds them through the entry points, next to the third-party ones installed.
    assert set(installed_registry().types()) >= PLUGIN_TYPES | PD_PLUGIN_TYPES


EVERY_PLUGIN = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 64, lruCapacityPerServer: 1000}}
- {type: inflight-load-producer, parameters: {addEstimatedOutputTokens: true}}
- {type: label-selector-filter, parameters: {matchExpressions: [{key: tier, operator: In, values: [gold]}]}}
- type: decode-filter
- type: prefill-filter
- type: encode-filter
- {type: by-label, parameters: {label: llm-d.ai/role, validValues: [encode-prefill-decode]}}
- {type: by-label-selector, parameters: {matchLabels: {tier: gold}}}
- {type: prefix-cache-affinity-filter, parameters: {affinityThreshold: 0.9}}
- type: queue-scorer
- type: running-requests-size-scorer
- type: kv-cache-utilization-scorer
- {type: load-aware-scorer, parameters: {threshold: 64}}
- {type: active-request-scorer, parameters: {idleThreshold: 1, maxBusyScore: 0.8}}
- {type: token-load-scorer, parameters: {queueThresholdTokens: 100000}}
- type: lora-affinity-scorer
- type: session-affinity-scorer
- {type: prefix-cache-scorer, parameters: {matchLengthWeight: 0.2}}
- {type: no-hit-lru-scorer, parameters: {lruSize: 16}}
- {type: weighted-random-picker, parameters: {maxNumOfEndpoints: 2}}
- type: max-score-picker
- type: random-picker
- type: single-profile-handler
- type: metrics-data-source
- type: core-metrics-extractor
- type: openai-parser
- type: vllmhttp-parser
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: label-selector-filter
  - pluginRef: decode-filter
  - pluginRef: prefill-filter
  - pluginRef: encode-filter
  - pluginRef: by-label
  - pluginRef: by-label-selector
  - pluginRef: prefix-cache-affinity-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: running-requests-size-scorer, weight: 1}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: load-aware-scorer, weight: 1}
  - {pluginRef: active-request-scorer, weight: 1}
  - {pluginRef: token-load-scorer, weight: 1}
  - {pluginRef: lora-affinity-scorer, weight: 1}
  - {pluginRef: session-affinity-scorer, weight: 5}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: no-hit-lru-scorer, weight: 1.5}
  - pluginRef: weighted-random-picker
"""


def test_a_config_with_every_plugin_type_loads_and_schedules() -> None:
    loaded = load_config(EVERY_PLUGIN, in_tree_registry(), "every.yaml")
    used = {p.type_name for p in loaded.scheduler.plugins}
    assert used == PLUGIN_TYPES  # every type, and nothing added by the loader
    assert loaded.implicit_plugins == []
    scheduler = loaded.scheduler
    for plugin in scheduler.plugins:  # the weighted-random picker decides: make the run repeatable
        if isinstance(plugin, BasePicker):
            plugin._rng.seed(7)
    gold = {"tier": "gold", ROLE_LABEL: "encode-prefill-decode"}
    endpoints = [
        make_endpoint("g1", labels=gold, waiting=1, kv=0.2, loras=["m"], max_loras=2),
        make_endpoint("g2", labels=gold, waiting=0, kv=0.5),
        make_endpoint("g3", labels=gold, running=9, kv=0.1),
        make_endpoint("silver", labels={"tier": "silver", ROLE_LABEL: "encode-prefill-decode"}),
        make_endpoint("plain"),
    ]
    seen = Counter[str]()
    sizes = Counter[int]()
    for i in range(40):
        request = make_request(f"conversation {i % 4} " * 50, model="m", request_id=str(i))
        result = route(scheduler, endpoints, request)
        picked = [ep.name for ep in result.primary.endpoints]
        assert set(picked) <= {"g1", "g2", "g3"}
        sizes[len(picked)] += 1
        seen[picked[0]] += 1
        if i % 2:
            complete(scheduler, request, result)
    assert len(seen) >= 2
    # Two picks (one a fallback for Envoy) until the affinity filter keeps only the warm endpoint.
    assert set(sizes) == {1, 2}
    # Half the requests are still running: the in-flight ledger holds them, on the endpoints.
    assert len(scheduler.handle.ledger) == 20
    assert sum(ep.inflight_requests for ep in endpoints) == 20
    assert sum(ep.inflight_tokens for ep in endpoints) > 0  # inflight-load-producer's estimates


def test_the_realistic_llm_d_config_loads_and_schedules() -> None:
    loaded = load_config(REALISTIC_CONFIG.read_text(), installed_registry(), str(REALISTIC_CONFIG))
    assert loaded.warnings == []  # the data layer it declares is what epp scrapes with
    assert loaded.implicit_plugins == ["max-score-picker", "single-profile-handler"]
    scheduler = loaded.scheduler
    endpoints = [make_endpoint(n) for n in "abcd"]
    system = "You are a coding agent. " * 100
    first = route(scheduler, endpoints, make_request(system + "task 1"))
    home = first.primary.endpoints[0].name
    # The prompt's prefix is now on `home`: the affinity filter keeps it there while it is loaded.
    for i in range(2, 6):
        assert (
            route(scheduler, endpoints, make_request(system + f"task {i}")).primary.endpoints[0].name == home
        )


def test_the_guides_removed_parameter_is_read_as_the_current_gate() -> None:
    # llm-d-router removed it (#1547) and rejects it; its guide still sets it. epp loads it as the
    # same gate in the current form (tokens / peakPrefillThroughput), with a warning.
    text = REALISTIC_CONFIG.read_text().replace(
        "    maxTTFTPenaltyMs: 0", "    maxTokensInFlightPenalty: 286720"
    )
    loaded = load_config(text, installed_registry(), "guide.yaml")
    (affinity,) = [p for p in loaded.scheduler.plugins if isinstance(p, PrefixCacheAffinityFilter)]
    assert affinity.max_penalty_ms == pytest.approx(286720 / 15928 * 1000, abs=0.001)
    assert any("maxTokensInFlightPenalty was removed" in w for w in loaded.warnings)


# --- pickers ----------------------------------------------------------------------------------------


def pick_counts(picker: Any, scores: list[float], draws: int) -> list[int]:
    endpoints = [make_endpoint(f"e{i}") for i in range(len(scores))]
    index = {ep.key: i for i, ep in enumerate(endpoints)}
    counts = [0] * len(scores)
    for _ in range(draws):
        counts[index[picker.pick(CycleState(), endpoints, scores)[0].key]] += 1
    return counts


def chi_square(counts: list[int], expected_share: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, expected_share, strict=True) if p > 0)


@pytest.mark.parametrize(
    ("scores", "share"),
    [
        ([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4]),
        ([0.5, 0.0, 1.5], [0.25, 0.0, 0.75]),
        ([0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]),  # all zero: uniform
        ([-2.0, 1.0], [0.0, 1.0]),  # negative totals weigh nothing
    ],
)
def test_weighted_random_follows_the_weights(scores: list[float], share: list[float]) -> None:
    counts = pick_counts(WeightedRandomPicker(rng=random.Random(11)), scores, 20_000)
    for c, p in zip(counts, share, strict=True):
        if p == 0:
            assert c == 0
    # chi-square with len-1 degrees of freedom; 16.3 is the 0.999 quantile for 3.
    assert chi_square(counts, share) < 16.3


def test_weighted_random_fallbacks_are_drawn_without_replacement() -> None:
    picker = WeightedRandomPicker(max_endpoints=3, rng=random.Random(5))
    endpoints = [make_endpoint(n) for n in "abcd"]
    seconds = Counter[str]()
    for _ in range(5000):
        chosen = picker.pick(CycleState(), endpoints, [8.0, 1.0, 1.0, 0.0])
        names = [ep.name for ep in chosen]
        assert len(set(names)) == 3
        assert "d" not in names  # a zero score comes only after every positive one
        seconds[names[1]] += 1
    # P(second = b) = P(a first) x 1/(1+1) + P(c first) x 1/(8+1)
    assert seconds["b"] / 5000 == pytest.approx(0.8 * 0.5 + 0.1 / 9, abs=0.03)


@pytest.mark.parametrize(
    ("max_endpoints", "scores", "first_choices", "length"),
    [
        (1, [0.1, 0.9, 0.5], {"b"}, 1),
        (1, [0.7, 0.7, 0.2], {"a", "b"}, 1),  # ties broken at random
        (2, [0.1, 0.9, 0.5], {"b"}, 2),
        (5, [0.1, 0.9, 0.5], {"b"}, 3),  # more than there are: all, best first
        (1, [], set(), 0),
    ],
)
def test_max_score_picker(
    max_endpoints: int, scores: list[float], first_choices: set[str], length: int
) -> None:
    picker = MaxScorePicker(max_endpoints=max_endpoints, rng=random.Random(1))
    endpoints = [make_endpoint(n) for n in "abc"[: len(scores)]]
    firsts = set()
    for _ in range(200):
        chosen = picker.pick(CycleState(), endpoints, scores)
        assert len(chosen) == length
        assert [scores[endpoints.index(ep)] for ep in chosen] == sorted(
            (scores[endpoints.index(ep)] for ep in chosen), reverse=True
        )
        if chosen:
            firsts.add(chosen[0].name)
    assert firsts == first_choices


def test_random_picker_ignores_scores() -> None:
    counts = pick_counts(RandomPicker(rng=random.Random(2)), [0.0, 100.0, 0.0], 9000)
    assert chi_square(counts, [1 / 3] * 3) < 13.8
    picker = RandomPicker(max_endpoints=2, rng=random.Random(2))
    chosen = picker.pick(CycleState(), [make_endpoint(n) for n in "abc"], [1, 1, 1])
    assert len({ep.name for ep in chosen}) == 2


# --- the example third-party scorer ----------------------------------------------------------------


def test_example_scorer_is_found_by_entry_point(caplog: pytest.LogCaptureFixture) -> None:
    registry = in_tree_registry()
    assert "kv-headroom-scorer" not in registry
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        registry.load_entry_points()
    assert "kv-headroom-scorer" in registry
    # It derives from epp.framework.Scorer: registered as it is, without the legacy adapter's warning.
    cls = registry.get("kv-headroom-scorer")
    assert cls is not None and issubclass(cls, Scorer) and cls.__module__ == "epp_kv_headroom"
    assert "kv-headroom-scorer" not in caplog.text


def test_example_scorer_changes_routing() -> None:
    # busy: slightly more free KV but 60 requests running; quiet: 2 running.
    endpoints = [make_endpoint("busy", kv=0.30, running=60), make_endpoint("quiet", kv=0.35, running=2)]
    default = load_scheduler(DEFAULT_CONFIG)
    custom = load_scheduler(EXAMPLE_CONFIG.read_text())
    for i in range(10):
        request = make_request(f"unrelated prompt {i}", request_id=str(i))
        assert route(default, endpoints, request).primary.endpoints[0].name == "busy"
        assert route(custom, endpoints, request).primary.endpoints[0].name == "quiet"


def test_example_config_passes_check_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", "--config-file", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_entry_points_that_fail_are_reported_not_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Good:
        type_name = "good-scorer"

        def __init__(self, name: str, params: Params) -> None:
            self.name = name

        def score(
            self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
        ) -> list[float]:
            return [1.0] * len(endpoints)

    def register(registry: PluginRegistry) -> None:
        registry.register(type("FromFunction", (Good,), {"type_name": "from-function"}))

    def broken() -> None:
        raise ImportError("no module named missing_dep")

    def buggy_register(registry: PluginRegistry) -> None:
        raise KeyError("a bug in a register function")

    fakes = [
        SimpleNamespace(name="broken", value="pkg:Broken", load=broken),
        SimpleNamespace(name="good-scorer", value="pkg:Good", load=lambda: Good),
        SimpleNamespace(
            name="misnamed", value="pkg:Good2", load=lambda: type("G2", (Good,), {"type_name": "g2"})
        ),
        SimpleNamespace(name="fn", value="pkg:register", load=lambda: register),
        SimpleNamespace(name="buggy", value="pkg:buggy_register", load=lambda: buggy_register),
        SimpleNamespace(name="junk", value="pkg:JUNK", load=lambda: 42),
        SimpleNamespace(
            name="dup", value="pkg:Q", load=lambda: type("Q", (Good,), {"type_name": "queue-scorer"})
        ),
        SimpleNamespace(
            name="inert", value="pkg:Inert", load=lambda: type("Inert", (), {"type_name": "inert"})
        ),
    ]
    registry = in_tree_registry()
    monkeypatch.setattr(registry_module, "entry_points", lambda group: fakes)
    with caplog.at_level(logging.WARNING):
        registry.load_entry_points()
    assert {"good-scorer", "from-function", "g2"} <= set(registry.types())
    assert "inert" not in registry
    assert registry.get("queue-scorer") is QueueScorer  # the in-tree one stays
    text = caplog.text
    assert "cannot load plugin entry point broken" in text and "missing_dep" in text
    assert "misnamed registers type 'g2'" in text
    assert "junk is neither a plugin class nor a register function" in text
    assert "plugin entry point buggy (pkg:buggy_register) failed to register: KeyError" in text
    assert "plugin type 'queue-scorer' is registered twice" in text
    assert "is not a Plugin subclass and has no score, filter or pick method" in text  # inert
    assert (
        "plugin good-scorer (" in text
        and "does not derive from the epp.framework plugin bases (Scorer)" in text
    )


class LegacyRunningScorer:
    """A third-party scorer written before the plugin base classes: no base class, a `type_name`,
    `__init__(name, params)` parsing its own parameters, a `score` method, and duck-typed
    lifecycle hooks (found by method name, as the old framework did)."""

    type_name = "legacy-running-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.count_waiting = params.get_bool("countWaiting", True)
        self.routed: list[str] = []
        self.completed: list[str] = []

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        self.routed.append(result.primary.endpoints[0].name)

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self.completed.append(endpoint.name)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        return [
            1.0
            / (1 + ep.metrics.running_requests + (ep.metrics.waiting_queue_size if self.count_waiting else 0))
            for ep in endpoints
        ]


LEGACY_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: legacy-running-scorer, name: fewest-running, parameters: {countWaiting: false}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: fewest-running, weight: 1}
"""


def test_an_old_style_duck_typed_scorer_still_loads_and_scores(caplog: pytest.LogCaptureFixture) -> None:
    registry = in_tree_registry()
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        registry.register(LegacyRunningScorer)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "plugin legacy-running-scorer (LegacyRunningScorer) does not derive from the epp.framework "
        "plugin bases (Scorer, PreRequest, ResponseComplete)"
    )
    cls = registry.get("legacy-running-scorer")
    assert cls is not None and issubclass(cls, Scorer)

    loaded = load_config(LEGACY_CONFIG, registry, "legacy.yaml")
    assert loaded.warnings == []
    (plugin,) = [p for p in loaded.scheduler.plugins if p.name == "fewest-running"]
    assert isinstance(plugin, Scorer) and plugin.type_name == "legacy-running-scorer"
    busy = make_endpoint("busy", running=4)
    queued = make_endpoint("queued", running=1, waiting=8)
    # Its parameters reach the old class: waiting requests are not counted.
    assert score(plugin, [busy, queued]) == [0.2, 0.5]
    request = make_request()
    result = route(loaded.scheduler, [busy, queued], request)
    assert result.primary.endpoints[0].name == "queued"
    # Its hooks run too.
    complete(loaded.scheduler, request, result)
    inner = plugin.inner  # type: ignore[attr-defined]
    assert (inner.routed, inner.completed) == (["queued"], ["queued"])
    # With its default (waiting requests count), the other endpoint wins.
    default = load_config(
        LEGACY_CONFIG.replace(", parameters: {countWaiting: false}", ""), registry, "legacy.yaml"
    )
    assert route(default.scheduler, [busy, queued], make_request()).primary.endpoints[0].name == "busy"
    # Its parameters are checked as any plugin's are.
    with pytest.raises(ConfigError, match="unknown parameter 'countwaiting'"):
        load_config(LEGACY_CONFIG.replace("countWaiting", "countwaiting"), registry, "legacy.yaml")
    with pytest.raises(ConfigError, match="'countWaiting' must be true or false"):
        load_config(LEGACY_CONFIG.replace("false}", "nope}"), registry, "legacy.yaml")


# --- lifecycle hooks through the director and the real gRPC server ---------------------------------


@pytest.fixture
async def fakes() -> Any:
    servers = [await FakeVllm(f"s{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


SESSION_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: session-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: session-affinity-scorer, weight: 10}
"""


async def test_session_token_is_set_on_responses_and_pins_the_session(fakes: list[FakeVllm]) -> None:
    async with running_epp(
        "--endpoints", ",".join(f.address for f in fakes), "--config-text", SESSION_CONFIG
    ) as epp:
        first, added = await exchange(ExtProcClient(epp.stub), {})
        assert added == {"x-session-token": base64.b64encode(first.encode()).decode()}
        # Make the pinned endpoint the longest queue: the token still wins (weight 10 vs 1).
        next(f for f in fakes if f.address == first).waiting = 50
        pinned = epp.app.datastore.get(first)
        assert pinned is not None
        await wait_until(lambda: pinned.metrics.waiting_queue_size == 50, what="the long queue scraped")
        for _ in range(5):
            destination, again = await exchange(
                ExtProcClient(epp.stub), {"x-session-token": added["x-session-token"]}
            )
            assert destination == first and again == added
        # Without the token, the queue decides.
        destination, _ = await exchange(ExtProcClient(epp.stub), {})
        assert destination != first


async def test_default_config_adds_no_response_headers(fakes: list[FakeVllm]) -> None:
    async with running_epp("--endpoints", ",".join(f.address for f in fakes)) as epp:
        _, added = await exchange(ExtProcClient(epp.stub), {})
        assert added == {}


class HookRecorder(PreRequest, ResponseComplete):
    """Records the lifecycle hooks each request goes through, in order."""

    type_name = "hook-recorder"

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.calls: list[tuple[str, str]] = []

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        self.calls.append(("pre_request", request.request_id))

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self.calls.append(("response_complete", request.request_id))


def director_for(config: str, endpoints: list[Endpoint]) -> Director:
    datastore = Datastore()
    datastore.replace_all(endpoints)
    registry = in_tree_registry()
    registry.register(HookRecorder)
    scheduler = load_config(config, registry).scheduler
    return Director(datastore, scheduler, EppMetrics(), scheduler.handle.ledger)


ACTIVE_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: active-request-scorer
- type: prefix-cache-scorer
- type: inflight-load-producer
- type: hook-recorder
"""


async def test_response_complete_never_overtakes_pre_request() -> None:
    a, b = make_endpoint("a", updated_at=0), make_endpoint("b", updated_at=0)
    director = director_for(ACTIVE_CONFIG, [a, b])
    (recorder,) = [p for p in director.scheduler.plugins if isinstance(p, HookRecorder)]

    def in_flight() -> tuple[int, int]:
        return a.inflight_requests + b.inflight_requests, a.inflight_tokens + b.inflight_tokens

    # Normal order: the request is charged when it is routed; its token estimate is added by
    # pre_request, after the reply; everything is released at the end.
    decision = director.schedule(make_request("p" * 300, request_id="1"), None)
    assert in_flight() == (1, 0)
    assert recorder.calls == []  # pre_request runs after the reply
    await asyncio.sleep(0)
    assert recorder.calls == [("pre_request", "1")]
    assert in_flight()[0] == 1 and in_flight()[1] > 0
    director.release(decision, completed=True)
    assert recorder.calls == [("pre_request", "1"), ("response_complete", "1")]
    assert in_flight() == (0, 0)
    # The stream dies before pre_request ran: it still runs, then response_complete, in that order.
    del recorder.calls[:]
    decision = director.schedule(make_request("q" * 300, request_id="2"), None)
    director.release(decision, completed=False)
    assert recorder.calls == []
    await asyncio.sleep(0)
    assert recorder.calls == [("pre_request", "2"), ("response_complete", "2")]
    assert in_flight() == (0, 0)  # the late pre_request charges nothing to a released request
    assert decision.endpoints[0].inflight_requests == 0


async def test_endpoint_removal_reaches_plugins() -> None:
    a, b = make_endpoint("a", updated_at=0), make_endpoint("b", updated_at=0)
    director = director_for(ACTIVE_CONFIG, [a, b])
    director.schedule(make_request("r" * 2000), None)
    await asyncio.sleep(0)
    (prefix,) = [p for p in director.scheduler.producers if isinstance(p, ApproxPrefixCacheProducer)]
    assert prefix.index.entries() > 0
    director.datastore.replace_all([])
    assert prefix.index.entries() == 0


# --- observability ------------------------------------------------------------------------------------


def test_plugin_duration_histogram_has_every_extension_point() -> None:
    metrics = EppMetrics()
    text = DEFAULT_CONFIG.replace(
        "plugins:\n- type: queue", "plugins:\n- type: decode-filter\n- type: queue"
    ).replace("  - pluginRef: queue-scorer", "  - pluginRef: decode-filter\n  - pluginRef: queue-scorer")
    scheduler = load_config(text, installed_registry(), timer=metrics.plugin_series).scheduler
    endpoints = [make_endpoint("a"), make_endpoint("b")]
    request = make_request("s" * 500)
    # As in the Go EPP, a plugin's series appears with its first run, not when it is configured.
    page = generate_latest(metrics.registry).decode()
    assert "llm_d_epp_plugin_duration_seconds_count{" not in page
    assert "# TYPE llm_d_epp_plugin_duration_seconds histogram" in page
    result = route(scheduler, endpoints, request)
    complete(scheduler, request, result)
    for point, kind in [
        ("DataProducer", "approx-prefix-cache-producer"),
        ("ProfilePicker", "single-profile-handler"),
        ("Filter", "decode-filter"),
        ("Scorer", "queue-scorer"),
        ("Scorer", "kv-cache-utilization-scorer"),
        ("Scorer", "prefix-cache-scorer"),
        ("Picker", "max-score-picker"),
        ("PreRequest", "approx-prefix-cache-producer"),
    ]:
        labels = {"extension_point": point, "plugin_type": kind, "plugin_name": kind}
        count = metrics.registry.get_sample_value("llm_d_epp_plugin_duration_seconds_count", labels)
        assert count and count >= 1, (point, kind)


def test_debug_log_shows_each_candidates_scores_and_is_off_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoints = [make_endpoint("a", waiting=4, kv=0.5), make_endpoint("b", waiting=0, kv=0.25)]
    scorers: list[tuple[Scorer, float]] = [(QueueScorer(), 2.0), (KvCacheUtilizationScorer(), 1.0)]
    with caplog.at_level(logging.INFO, logger="epp.scheduling.decisions"):
        run = run_profile(scorers, endpoints, make_request(request_id="quiet"))
    assert run.picked == ["b"] and not caplog.records
    with caplog.at_level(logging.DEBUG, logger="epp.scheduling.decisions"):
        run_profile(scorers, endpoints, make_request(request_id="req-7"))
    (record,) = caplog.records
    message = record.getMessage()
    assert "req-7" in message and "profile test" in message
    assert "'a:8000': {'total': 0.5, 'queue-scorer': 0.0, 'kv-cache-utilization-scorer': 0.5}" in message
    assert "'b:8000': {'total': 2.75, 'queue-scorer': 1.0, 'kv-cache-utilization-scorer': 0.75}" in message
    assert message.endswith("'picked': ['b:8000']}")


# --- the scorer author kit ------------------------------------------------------------------------


def test_run_profile_reports_candidates_scores_and_totals() -> None:
    endpoints = [
        make_endpoint("a", waiting=2, role="prefill"),
        make_endpoint("b", waiting=6),
        make_endpoint("c"),
    ]
    run = run_profile(
        [(QueueScorer(), 2.0), (KvCacheUtilizationScorer(), 0.5)], endpoints, filters=[DecodeFilter()]
    )
    assert run.candidates == ["b", "c"]
    assert run.scores == {
        "queue-scorer": {"b": 0.0, "c": 1.0},
        "kv-cache-utilization-scorer": {"b": 1.0, "c": 1.0},
    }
    assert run.totals == {"b": 0.5, "c": 2.5}
    assert run.picked == ["c"]
    nobody = run_profile([(QueueScorer(), 1.0)], endpoints[:1], filters=[DecodeFilter()])
    assert nobody.picked == [] and nobody.candidates == []


def test_route_raises_when_filters_leave_nobody() -> None:
    scheduler = load_scheduler(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: prefill-filter}]\n"
    )
    with pytest.raises(EppError, match="no endpoint passed the filters"):
        route(scheduler, [make_endpoint("plain")], make_request())


def test_make_request_chat_and_headers() -> None:
    request = make_request(messages=[{"role": "user", "content": "hi"}], headers={"X-Session-Token": "t"})
    assert request.api.value == "/v1/chat/completions" and request.headers == {"x-session-token": "t"}
    assert request.prompt_text == '[{"role":"user","content":"hi"}]'
    assert math.isclose(make_endpoint("e", kv=0.5).metrics.kv_cache_usage, 0.5)


class BrokenHook(PreRequest):
    """A plugin whose pre_request hook fails on every request."""

    type_name = "broken-hook"

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        raise KeyError("a bug in a plugin")


def test_a_hook_failing_on_every_request_routes_them_all_and_logs_a_few(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing hook is never fatal, and one that fails on every request does not write a
    traceback a request: at most HOOK_ERROR_LOG_BURST per interval, then they are counted."""
    from epp.scheduling.scheduler import HOOK_ERROR_LOG_BURST

    registry = in_tree_registry()
    registry.register(BrokenHook)
    scheduler = load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins:\n- {type: broken-hook}\n- {type: max-score-picker}\n"
        "schedulingProfiles:\n- name: default\n"
        "  plugins: [{pluginRef: broken-hook}, {pluginRef: max-score-picker}]\n",
        registry,
    ).scheduler
    endpoints = [make_endpoint("a"), make_endpoint("b")]
    with caplog.at_level(logging.ERROR, logger="epp.scheduling.scheduler"):
        picked = [
            route(scheduler, endpoints, make_request(f"p{i}")).primary.endpoints[0].name for i in range(50)
        ]
    assert len(picked) == 50
    failures = [r for r in caplog.records if "PreRequest hook of plugin broken-hook failed" in r.getMessage()]
    assert 1 <= len(failures) <= HOOK_ERROR_LOG_BURST
    assert failures[0].exc_info is not None and "a bug in a plugin" in str(failures[0].exc_info[1])
