"""The director on its own: candidates, scheduling, the in-flight ledger, fallbacks, release."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import pytest

from epp.datalayer.datastore import Datastore
from epp.errors import EppError, ErrorCode
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    InFlightLedger,
    PreRequest,
    ResponseComplete,
    SchedulingResult,
)
from epp.framework.registry import installed_registry
from epp.observability import EppMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.loader import DEFAULT_CONFIG
from epp.testing import load_scheduler, make_endpoint, make_request

PD_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
- type: queue-scorer
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
"""


def fresh(ep: Endpoint) -> Endpoint:
    ep.metrics = type(ep.metrics)(updated_at=time.monotonic())
    return ep


def director_for(endpoints: list[Endpoint], config: str = DEFAULT_CONFIG) -> tuple[Director, InFlightLedger]:
    store = Datastore()
    store.replace_all(endpoints)
    scheduler = load_scheduler(config)
    ledger = scheduler.handle.ledger
    return Director(store, scheduler, EppMetrics(), ledger), ledger


def test_subset_hint_matches_on_the_ip_and_empty_is_503() -> None:
    a, b = make_endpoint("a", address="10.0.0.1"), make_endpoint("b", address="10.0.0.2")
    b2 = make_endpoint("b2", address="10.0.0.2", port=8001)  # the same pod's second port
    v6 = make_endpoint("v6", address="fd00::1")
    director, _ = director_for([a, b, b2, v6])
    narrowed = director.candidates(["10.0.0.2:8000"])
    assert narrowed == (b, b2)  # the port is not compared (as in Go)
    assert director.candidates(["10.0.0.2:8000"]) is narrowed  # the same hint: the same tuple
    assert director.candidates(["10.0.0.1"]) == (a,)
    assert director.candidates(["[fd00::1]:9000"]) == (v6,)
    assert director.candidates(None) == (a, b, b2, v6)  # the datastore's tuple itself
    with pytest.raises(EppError) as err:
        director.candidates([])
    assert err.value.code is ErrorCode.SERVICE_UNAVAILABLE
    assert err.value.dropped_reason == "rejected-no-endpoints"
    director.use_subset_hint = False  # --disable-endpoint-subset-filter
    assert list(director.candidates([])) == [a, b, b2, v6]


def test_fresh_endpoints_are_preferred_and_all_used_when_none_is_fresh() -> None:
    stale, live, other = (
        make_endpoint("stale", updated_at=0.0),
        fresh(make_endpoint("live")),
        fresh(make_endpoint("o")),
    )
    director, _ = director_for([stale, live, other])
    first = director.candidates(None)
    # The same tuple while the same endpoints are stale: what plugins' caches key on.
    assert first == (live, other) and director.candidates(None) is first
    other.metrics = type(other.metrics)(updated_at=0.0)
    assert director.candidates(None) == (live,)
    fresh(other)
    assert director.candidates(None) == (live, other)
    other.metrics = live.metrics = type(live.metrics)(updated_at=0.0)
    assert list(director.candidates(None)) == [stale, live, other]
    fresh(stale), fresh(live), fresh(other)  # all fresh: the datastore's tuple itself (the scorers' columns)
    assert director.candidates(None) is director.datastore.endpoints()


async def test_schedule_charges_every_profile_primary_and_release_frees_them() -> None:
    prefill = fresh(make_endpoint("p", role="prefill"))
    decode = fresh(make_endpoint("d", role="decode"))
    director, ledger = director_for([prefill, decode], PD_CONFIG)
    request = make_request("a prompt")
    decision = director.schedule(request, None)
    assert decision.destination == decode.key
    assert decision.result is not None and decision.result.headers == {"x-prefiller-host-port": prefill.key}
    assert (decode.inflight_requests, prefill.inflight_requests) == (1, 1)
    await asyncio.sleep(0)  # the pre_request hooks run after the reply
    director.release(decision, completed=True)
    director.release(decision, completed=True)  # idempotent
    assert (decode.inflight_requests, prefill.inflight_requests) == (0, 0) and len(ledger) == 0


async def test_served_elsewhere_moves_the_charge_once() -> None:
    a, b = fresh(make_endpoint("a")), fresh(make_endpoint("b"))
    director, _ = director_for([a, b])
    decision = director.schedule(make_request("hello " * 100), None)
    primary = decision.endpoints[0]
    other = b if primary is a else a
    director.response_headers(decision, other.key)
    assert (primary.inflight_requests, other.inflight_requests) == (0, 1)
    assert decision.serving_endpoint is other
    director.response_headers(decision, primary.key)  # a second report changes nothing
    assert (primary.inflight_requests, other.inflight_requests) == (0, 1)
    assert director.metrics.registry.get_sample_value("epp_fallback_endpoint_served_total") == 1.0
    director.release(decision, completed=True)
    assert (primary.inflight_requests, other.inflight_requests) == (0, 0)


TOKEN_LOAD_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: inflight-load-producer
- type: token-load-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: token-load-scorer}]
"""


async def test_a_fallback_reported_before_the_hooks_ran_carries_the_token_estimate_with_it() -> None:
    """The response headers can overtake the pre-request hooks (they run after the reply): the
    hooks record the estimate on the planned endpoint's charge first, then the charge moves, so the
    endpoint that serves holds the tokens, and releasing leaves both at zero."""
    a, b = fresh(make_endpoint("a")), fresh(make_endpoint("b"))
    director, _ = director_for([a, b], TOKEN_LOAD_CONFIG)
    decision = director.schedule(make_request("hello " * 100), None)
    primary = decision.endpoints[0]
    other = b if primary is a else a
    director.response_headers(decision, other.key)  # before the hooks' turn
    assert other.inflight_tokens > 0 and primary.inflight_tokens == 0
    await asyncio.sleep(0)
    director.release(decision, completed=True)
    assert (a.inflight_tokens, b.inflight_tokens, a.inflight_requests, b.inflight_requests) == (0, 0, 0, 0)


class _Lifecycle(PreRequest, ResponseComplete):
    type_name = "lifecycle-recorder"
    calls: ClassVar[list[str]] = []

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        _Lifecycle.calls.append("pre_request")

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        _Lifecycle.calls.append("response_complete")


async def test_a_headers_only_request_runs_no_lifecycle_hook_at_either_end() -> None:
    """No pre-request hook runs for a request without a body, so no completion hook may either: a
    plugin counting what is in flight would count one out that never came in."""
    registry = installed_registry()
    registry.register(_Lifecycle)
    config = DEFAULT_CONFIG.replace("plugins:\n", "plugins:\n- type: lifecycle-recorder\n", 1)
    store = Datastore()
    ep = fresh(make_endpoint("a"))
    store.replace_all([ep])
    scheduler = load_scheduler(config, registry)
    director = Director(store, scheduler, EppMetrics(), scheduler.handle.ledger)
    _Lifecycle.calls.clear()
    decision = director.pick_any(make_request(), None)
    await asyncio.sleep(0)
    director.release(decision, completed=True)
    assert _Lifecycle.calls == []
    decision = director.schedule(make_request("a prompt"), None)  # a request with a body: both
    await asyncio.sleep(0)
    director.release(decision, completed=True)
    assert _Lifecycle.calls == ["pre_request", "response_complete"]


async def test_headers_only_requests_go_to_the_least_loaded() -> None:
    busy, idle = make_endpoint("busy", inflight_requests=3), make_endpoint("idle")
    director, _ = director_for([busy, idle])
    decision = director.pick_any(make_request(), None)
    assert decision.endpoints == [idle] and idle.inflight_requests == 1
    director.release(decision, completed=False)
    assert idle.inflight_requests == 0


async def test_no_endpoint_passing_the_filters_is_429() -> None:
    director, ledger = director_for([fresh(make_endpoint("p", role="prefill"))], PD_CONFIG)
    with pytest.raises(EppError) as err:
        director.schedule(make_request(), None)
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED and len(ledger) == 0
