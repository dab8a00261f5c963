"""Prefill/decode disaggregation in epp: the deciders, disagg-profile-handler and the older
pd-profile-handler, the x-prefiller-host-port header on the ext_proc reply, and the decision metric."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.framework import ConfigError, Endpoint, SchedulingResult
from epp.framework.registry import installed_registry
from epp.scheduling.loader import load_config
from epp.scheduling.scheduler import Scheduler
from epp.testing import make_endpoint, make_request, route
from epp_bench.workloads import make_text
from epp_scorers.profile_handlers.disagg import PREFILL_HEADER, DisaggProfileHandler, PdProfileHandler
from tests.support.epp_app import RunningEpp, running_epp, wait_until
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm

pytestmark = pytest.mark.timeout(30)

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PROFILES = """\
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""
COMMON_PLUGINS = """\
- type: decode-filter
- type: prefill-filter
- type: queue-scorer
- type: prefix-cache-scorer
"""
DECISIONS = "llm_d_epp_disagg_decision_total"
# Its labels besides model_name and decision_type: the handler that decided.
HANDLER = {"plugin_name": "disagg-profile-handler", "plugin_type": "disagg-profile-handler"}


def pd_config(non_cached: int = 128, prompt_tokens: int = 0, decider: str = "prefix-based-pd-decider") -> str:
    if decider == "prefix-based-pd-decider":
        decider_spec = (
            f"- type: prefix-based-pd-decider\n"
            f"  parameters: {{nonCachedTokens: {non_cached}, promptTokens: {prompt_tokens}}}\n"
        )
    else:
        decider_spec = f"- type: {decider}\n"
    return (
        HEAD
        + "plugins:\n"
        + COMMON_PLUGINS
        + decider_spec
        + f"- type: disagg-profile-handler\n  parameters: {{deciders: {{prefill: {decider}}}}}\n"
        + PROFILES
    )


def text(tokens: int, seed: int) -> str:
    """`tokens` tokens of 4 characters each, unique per seed."""
    return make_text(random.Random(seed), tokens)


def picks(result: SchedulingResult) -> dict[str, str]:
    return {name: r.endpoints[0].name for name, r in result.profiles.items()}


def handle_decisions(scheduler: Scheduler, kind: str, model: str = "model") -> float:
    """The disagg decision counter, which the handler registers in the scheduler's handle registry."""
    value = scheduler.handle.registry.get_sample_value(
        DECISIONS, {**HANDLER, "model_name": model, "decision_type": kind}
    )
    return value or 0.0


def endpoints(decode: int = 1, prefill: int = 1) -> list[Endpoint]:
    return [make_endpoint(f"d{i}", role="decode") for i in range(decode)] + [
        make_endpoint(f"p{i}", role="prefill") for i in range(prefill)
    ]


# --- deciders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("non_cached", "prompt_tokens", "cached", "new", "disaggregated"),
    [
        # Nothing cached: the whole input counts.
        (128, 0, 0, 127, False),
        (128, 0, 0, 128, True),
        (128, 0, 0, 129, True),
        # 512 tokens (8 blocks of 64) already on the decode pod: only the rest counts.
        (128, 0, 512, 127, False),
        (128, 0, 512, 128, True),
        # promptTokens: shorter prompts never disaggregate, however little is cached.
        (128, 1000, 0, 999, False),
        (128, 1000, 0, 1000, True),
        # nonCachedTokens 0 disables the decider.
        (0, 0, 0, 5000, False),
    ],
)
def test_prefix_based_decider_threshold(
    non_cached: int, prompt_tokens: int, cached: int, new: int, disaggregated: bool
) -> None:
    scheduler = load_config(pd_config(non_cached, prompt_tokens), installed_registry()).scheduler
    eps = endpoints()
    document = text(cached, seed=1)
    if cached:
        first = route(scheduler, eps, make_request(document))  # puts the document on d0
        assert picks(first)["decode"] == "d0"
    before = {kind: handle_decisions(scheduler, kind) for kind in ("decode-only", "prefill-decode")}
    result = route(scheduler, eps, make_request(document + text(new, seed=2)))
    assert result.primary_profile == "decode"
    if disaggregated:
        assert picks(result) == {"decode": "d0", "prefill": "p0"}
        assert result.headers == {PREFILL_HEADER: "p0:8000"}
    else:
        assert picks(result) == {"decode": "d0"}
        assert result.headers is None
    # The handler counts the decision in the scheduler's handle registry.
    decided = "prefill-decode" if disaggregated else "decode-only"
    other = "decode-only" if disaggregated else "prefill-decode"
    assert handle_decisions(scheduler, decided) == before[decided] + 1
    assert handle_decisions(scheduler, other) == before[other]


def test_always_disagg_decider_disaggregates_even_a_cached_prompt() -> None:
    scheduler = load_config(pd_config(decider="always-disagg-pd-decider"), installed_registry()).scheduler
    eps = endpoints()
    prompt = text(16, seed=3)
    for _ in range(3):
        assert picks(route(scheduler, eps, make_request(prompt))) == {"decode": "d0", "prefill": "p0"}


def test_a_huge_model_name_is_counted_as_other_not_kept_whole() -> None:
    """The body's `model` is the client's: a 100 kB one must not become a label value."""
    scheduler = load_config(pd_config(decider="always-disagg-pd-decider"), installed_registry()).scheduler
    route(scheduler, endpoints(), make_request(text(16, seed=3), model="m" * 100_000))
    route(scheduler, endpoints(), make_request(text(16, seed=4), model="m" * 1024))  # at the bound
    assert handle_decisions(scheduler, "prefill-decode", model="other") == 1
    assert handle_decisions(scheduler, "prefill-decode", model="m" * 1024) == 1


def test_cached_prefix_on_the_decode_pod_skips_prefill() -> None:
    scheduler = load_config(pd_config(non_cached=256), installed_registry()).scheduler
    eps = endpoints(decode=3, prefill=2)
    document = text(2048, seed=4)
    first = route(scheduler, eps, make_request(document + " Summarize it."))
    assert set(picks(first)) == {"decode", "prefill"}
    home = picks(first)["decode"]
    # Follow-up questions on the same document: the decode pod that holds it is chosen again, and
    # what it lacks (a short question) is below the threshold, so it prefills locally.
    for i in range(4):
        follow_up = route(scheduler, eps, make_request(document + f" Question {i}: {text(40, seed=10 + i)}"))
        assert picks(follow_up) == {"decode": home}
        assert follow_up.headers is None
    # A long new part still goes to a prefill pod.
    long_follow_up = route(scheduler, eps, make_request(document + text(400, seed=20)))
    assert picks(long_follow_up)["decode"] == home
    assert "prefill" in picks(long_follow_up)


def test_prefix_index_records_the_prefill_pod_too() -> None:
    scheduler = load_config(pd_config(non_cached=128), installed_registry()).scheduler
    eps = endpoints(decode=2, prefill=3)
    for doc in range(6):
        document = text(1024, seed=100 + doc)
        first = picks(route(scheduler, eps, make_request(document + text(300, seed=200 + doc))))
        # A new long question on the same document: the prefill pod that computed the document
        # holds its KV, so the prefill profile's prefix scorer goes back to it.
        again = picks(route(scheduler, eps, make_request(document + text(300, seed=300 + doc))))
        assert again["prefill"] == first["prefill"], (doc, first, again)
        assert again["decode"] == first["decode"]


def test_no_prefill_endpoint_means_decode_only_not_an_error() -> None:
    scheduler = load_config(pd_config(non_cached=16), installed_registry()).scheduler
    decode_only = [make_endpoint("d0", role="decode"), make_endpoint("d1", role="decode"), make_endpoint("u")]
    result = route(scheduler, decode_only, make_request(text(2000, seed=5)))
    assert list(result.profiles) == ["decode"]
    assert result.headers is None


def test_client_supplied_prefill_header_is_removed_when_decode_only() -> None:
    scheduler = load_config(pd_config(non_cached=1000), installed_registry()).scheduler
    request = make_request("short", headers={PREFILL_HEADER: "10.9.9.9:8000"})
    result = route(scheduler, endpoints(), request)
    assert result.headers == {PREFILL_HEADER: None}
    long_request = make_request(text(1200, seed=6), headers={PREFILL_HEADER: "10.9.9.9:8000"})
    assert route(scheduler, endpoints(), long_request).headers == {PREFILL_HEADER: "p0:8000"}


# --- configuration -------------------------------------------------------------------------------


def test_upstream_pd_config_loads() -> None:
    # llm-d-router deploy/config/pd-epp-config.yaml, the handler declared before its decider.
    config = (
        HEAD
        + """\
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 16384, lruCapacityPerServer: 31250}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: prefix-based-pd-decider
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 16
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
"""
    )
    loaded = load_config(config, installed_registry())
    assert loaded.warnings == []
    assert isinstance(loaded.scheduler.handler, DisaggProfileHandler)
    assert picks(route(loaded.scheduler, endpoints(), make_request(text(16, 7)))) == {
        "decode": "d0",
        "prefill": "p0",
    }


# The first pd-profile-handler layout (llm-d-inference-scheduler before v0.6), as its
# deploy/config/sim-pd-epp-config.yaml had it.
LEGACY_PD_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-header-handler
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 5
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: pd-profile-handler
  parameters:
    threshold: THRESHOLD
    hashBlockSize: 5
    primaryPort: 8000
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
"""


def test_legacy_pd_profile_handler_threshold_maps_to_the_prefix_decider() -> None:
    loaded = load_config(LEGACY_PD_CONFIG.replace("THRESHOLD", "100"), installed_registry())
    assert isinstance(loaded.scheduler.handler, PdProfileHandler)
    warnings = "\n".join(loaded.warnings)
    assert "prefix-based-pd-decider with nonCachedTokens 100" in warnings
    assert "'primaryPort' is not implemented" in warnings
    assert "type 'pd-profile-handler' is deprecated; use disagg-profile-handler" in warnings
    assert "type 'prefill-header-handler' is deprecated" in warnings
    assert "'hashBlockSize' (characters) is deprecated" in warnings
    scheduler = loaded.scheduler
    assert list(picks(route(scheduler, endpoints(), make_request(text(99, 8))))) == ["decode"]
    assert list(picks(route(scheduler, endpoints(), make_request(text(100, 9))))) == ["decode", "prefill"]


def test_legacy_pd_profile_handler_threshold_zero_always_disaggregates() -> None:
    loaded = load_config(LEGACY_PD_CONFIG.replace("THRESHOLD", "0"), installed_registry())
    assert "always-disagg-pd-decider (threshold 0)" in "\n".join(loaded.warnings)
    result = route(loaded.scheduler, endpoints(), make_request("hi"))
    assert list(picks(result)) == ["decode", "prefill"]


def test_pd_profile_handler_uses_its_named_decider() -> None:
    config = (
        HEAD
        + "plugins:\n"
        + COMMON_PLUGINS
        + "- {type: prefix-based-pd-decider, name: pd, parameters: {nonCachedTokens: 50}}\n"
        + "- {type: pd-profile-handler, parameters: {deciderPluginName: pd}}\n"
        + PROFILES
    )
    scheduler = load_config(config, installed_registry()).scheduler
    assert list(picks(route(scheduler, endpoints(), make_request(text(49, 10))))) == ["decode"]
    assert list(picks(route(scheduler, endpoints(), make_request(text(50, 11))))) == ["decode", "prefill"]


def test_flat_disagg_parameters_are_deprecated_but_work() -> None:
    config = (
        HEAD
        + "plugins:\n"
        + COMMON_PLUGINS
        + "- {type: always-disagg-pd-decider, name: always}\n"
        + "- type: disagg-profile-handler\n"
        + "  parameters: {decodeProfile: d, prefillProfile: p, prefillDeciderPluginName: always}\n"
        + PROFILES.replace("name: decode", "name: d").replace("name: prefill", "name: p")
    )
    loaded = load_config(config, installed_registry())
    assert any(
        "'prefillDeciderPluginName' is deprecated; use 'deciders.prefill'" in w for w in loaded.warnings
    )
    result = route(loaded.scheduler, endpoints(), make_request("x"))
    assert result.primary_profile == "d"
    assert picks(result) == {"d": "d0", "p": "p0"}


def test_flat_prefill_decider_name_wins_over_the_older_alias() -> None:
    config = (
        HEAD
        + "plugins:\n"
        + COMMON_PLUGINS
        + "- {type: always-disagg-pd-decider, name: always}\n"
        + "- {type: prefix-based-pd-decider, name: never}\n"
        + "- type: disagg-profile-handler\n"
        + "  parameters: {prefillDeciderPluginName: always, deciderPluginName: never}\n"
        + PROFILES
    )
    scheduler = load_config(config, installed_registry()).scheduler
    assert list(picks(route(scheduler, endpoints(), make_request("x")))) == ["decode", "prefill"]


@pytest.mark.parametrize(
    ("plugins", "profiles", "error"),
    [
        (
            "- {type: disagg-profile-handler, parameters: {deciders: {prefill: nope}}}\n",
            PROFILES,
            "plugin 'disagg-profile-handler' (disagg-profile-handler): deciders.prefill names plugin 'nope', "
            "which is not defined",
        ),
        (
            "- {type: disagg-profile-handler, parameters: {deciders: {prefill: queue-scorer}}}\n",
            PROFILES,
            "names plugin 'queue-scorer' (queue-scorer), which is not a P/D decider",
        ),
        (
            "- {type: disagg-profile-handler, parameters: {profiles: {decode: dec}}}\n",
            PROFILES,
            "decode profile 'dec' is not defined (profiles: decode, prefill)",
        ),
        (
            "- {type: disagg-profile-handler, parameters: {decodeProfile: decode, deciders: {prefill: x}}}\n",
            PROFILES,
            "mix two formats",
        ),
        (
            "- {type: disagg-profile-handler, parameters: {stageOrder: prefill-first}}\n",
            PROFILES,
            "stageOrder 'prefill-first' is not implemented by epp",
        ),
        (
            "- {type: disagg-profile-handler, parameters: {deciders: {encode: x}}}\n",
            PROFILES,
            "encode disaggregation (an encode decider) is not implemented by epp",
        ),
        (
            "- {type: disagg-profile-handler, parameters: {deciders: {prefill: x, oops: y}}}\n",
            PROFILES,
            "unknown parameter 'deciders.oops'",
        ),
        (
            "- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: -1}}\n"
            "- type: disagg-profile-handler\n",
            PROFILES,
            "parameter 'nonCachedTokens' must be >= 0",
        ),
        (
            "- {type: pd-profile-handler, parameters: {deciderPluginName: missing}}\n",
            PROFILES,
            "deciderPluginName names plugin 'missing', which is not defined",
        ),
        (
            "- {type: pd-profile-handler, parameters: {threshold: 5, deciderPluginName: x}}\n",
            PROFILES,
            "cannot be combined",
        ),
        ("", PROFILES, "2 profiles need a profile handler plugin (for prefill/decode disaggregation"),
    ],
    ids=[
        "dangling-decider",
        "not-a-decider",
        "missing-decode-profile",
        "mixed-formats",
        "prefill-first",
        "encode",
        "unknown-nested",
        "negative-threshold",
        "pd-dangling-decider",
        "pd-threshold-and-decider",
        "no-handler",
    ],
)
def test_config_errors(plugins: str, profiles: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(
            HEAD + "plugins:\n" + COMMON_PLUGINS + plugins + profiles, installed_registry(), "pd.yaml"
        )
    assert error in str(raised.value)
    assert str(raised.value).startswith("pd.yaml: ")


@pytest.mark.parametrize(
    ("plugins", "profiles", "warning"),
    [
        (
            "- type: disagg-profile-handler\n",
            PROFILES,
            "no P/D decider is configured, so profile 'prefill' never runs",
        ),
        (
            "- type: always-disagg-pd-decider\n"
            "- {type: disagg-profile-handler, parameters: {deciders: {prefill: always-disagg-pd-decider}}}\n",
            PROFILES.split("- name: prefill")[0],
            "there is no profile 'prefill', so requests are never disaggregated",
        ),
        (
            "- {type: prefix-based-pd-decider}\n"
            "- {type: disagg-profile-handler, parameters: {deciders: {prefill: prefix-based-pd-decider}}}\n",
            PROFILES,
            "nonCachedTokens is 0: this decider never disaggregates",
        ),
        (
            "- type: pd-profile-handler\n",
            PROFILES,
            "no plugin named 'prefix-based-pd-decider' (the default deciderPluginName): every request is "
            "disaggregated",
        ),
    ],
    ids=["no-decider", "no-prefill-profile", "decider-disabled", "pd-without-decider"],
)
def test_config_warnings(plugins: str, profiles: str, warning: str) -> None:
    loaded = load_config(HEAD + "plugins:\n" + COMMON_PLUGINS + plugins + profiles, installed_registry())
    assert any(warning in w for w in loaded.warnings), loaded.warnings


def test_decider_adds_the_prefix_producer_it_needs() -> None:
    config = (
        HEAD
        + "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: queue-scorer\n"
        + "- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 64}}\n"
        + "- {type: disagg-profile-handler, parameters: {deciders: {prefill: prefix-based-pd-decider}}}\n"
        + "schedulingProfiles:\n"
        + "- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]}\n"
        + "- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]}\n"
    )
    loaded = load_config(config, installed_registry())
    assert "approx-prefix-cache-producer" in loaded.implicit_plugins
    scheduler = loaded.scheduler
    eps = endpoints()
    document = text(256, 12)
    assert "prefill" in picks(route(scheduler, eps, make_request(document)))
    # The decode pod now holds the document: the same prompt needs no prefill.
    assert list(picks(route(scheduler, eps, make_request(document)))) == ["decode"]


# --- through epp's ext_proc server ---------------------------------------------------------------


def set_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def removed_headers(reply: pb.ProcessingResponse) -> list[str]:
    return list(reply.request_headers.response.header_mutation.remove_headers)


@pytest.fixture
async def pods() -> AsyncIterator[dict[str, FakeVllm]]:
    servers = {name: await FakeVllm(name).start() for name in ("d0", "d1", "p0")}
    yield servers
    for server in servers.values():
        await server.stop()


def endpoints_file(tmp_path: Path, pods: dict[str, FakeVllm], names: list[str]) -> Path:
    entries = [
        {
            "address": "127.0.0.1",
            "port": pods[n].port,
            "name": n,
            "labels": {"llm-d.ai/role": "prefill" if n.startswith("p") else "decode"},
        }
        for n in names
    ]
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def decisions(epp: RunningEpp, kind: str) -> float:
    labels = {**HANDLER, "model_name": "m", "decision_type": kind}
    value = epp.app.metrics.registry.get_sample_value(DECISIONS, labels)
    return value or 0.0


async def test_extproc_reply_carries_the_prefill_pod_and_counts_decisions(
    tmp_path: Path, pods: dict[str, FakeVllm]
) -> None:
    path = endpoints_file(tmp_path, pods, ["d0", "d1", "p0"])
    async with running_epp("--endpoints-file", str(path), "--config-text", pd_config(non_cached=200)) as epp:
        await wait_until(lambda: len(epp.app.datastore) == 3, what="endpoints")
        # Scraped once each: an endpoint never scraped is stale, and left out while others are fresh.
        await wait_until(
            lambda: all(ep.metrics.updated_at > 0 for ep in epp.app.datastore.endpoints()), what="scrapes"
        )
        decode_addresses = {pods["d0"].address, pods["d1"].address}
        for i in range(3):
            body = orjson.dumps({"model": "m", "prompt": text(800, seed=50 + i)})
            reply = (await one_request(epp.stub, request_headers(), body))[0]
            headers = set_headers(reply)
            assert headers["x-gateway-destination-endpoint"] in decode_addresses
            assert headers[PREFILL_HEADER] == pods["p0"].address
        spoofed = request_headers(**{PREFILL_HEADER: "10.6.6.6:80"})
        for i in range(2):
            body = orjson.dumps({"model": "m", "prompt": f"short question {i}"})
            reply = (await one_request(epp.stub, spoofed, body))[0]
            assert PREFILL_HEADER not in set_headers(reply)
            assert removed_headers(reply) == [PREFILL_HEADER]
        assert decisions(epp, "prefill-decode") == 3
        assert decisions(epp, "decode-only") == 2
        labels = {
            "plugin_name": "disagg-profile-handler",
            "plugin_type": "disagg-profile-handler",
            "model_name": "m",
            "decision_type": "prefill-decode",
        }
        assert epp.app.metrics.registry.get_sample_value("llm_d_epp_disagg_decision_total", labels) == 3


async def test_extproc_without_prefill_pods_serves_decode_only(
    tmp_path: Path, pods: dict[str, FakeVllm]
) -> None:
    path = endpoints_file(tmp_path, pods, ["d0", "d1"])
    async with running_epp("--endpoints-file", str(path), "--config-text", pd_config(non_cached=16)) as epp:
        await wait_until(lambda: len(epp.app.datastore) == 2, what="endpoints")
        body = orjson.dumps({"model": "m", "prompt": text(2000, seed=60)})
        replies = await one_request(epp.stub, request_headers(), body)
        assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
        assert PREFILL_HEADER not in set_headers(replies[0])
        assert decisions(epp, "decode-only") == 1
        assert decisions(epp, "prefill-decode") == 0


async def test_single_profile_config_sends_no_prefill_header_and_no_decision(
    pods: dict[str, FakeVllm],
) -> None:
    async with running_epp("--endpoints", pods["d0"].address) as epp:
        body = orjson.dumps({"model": "m", "prompt": text(2000, seed=61)})
        reply = (await one_request(epp.stub, request_headers(), body))[0]
        assert set(set_headers(reply)) == {"x-gateway-destination-endpoint", "content-length", "x-request-id"}
        assert removed_headers(reply) == []
        assert decisions(epp, "decode-only") == 0
