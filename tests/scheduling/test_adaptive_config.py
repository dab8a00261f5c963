"""examples/configs/epp-adaptive.yaml as an operator runs it: a prefix group stays on the pod that
holds its prefix while the wait there costs less than a cold prefill elsewhere, and its next
request goes to another pod once the wait costs more. The latency model learns from responses
routed through the same scheduler, as in epp."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from epp.framework import Endpoint, ResponseStats
from epp.scheduling.scheduler import Scheduler
from epp.testing import complete, load_scheduler, make_endpoint, make_request, route
from epp_scorers.producers.predicted_latency import PredictedLatencyProducer

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "epp-adaptive.yaml"
SYSTEM = [f"You are assistant number {g}. Answer briefly and cite the manual. " * 40 for g in range(6)]
TAUGHT = 4  # groups 0-3 teach the model (every pod holds them); 4 and 5 are the groups under test


def set_load(ep: Endpoint, waiting: int, inflight: int = 0, kv: float = 0.0) -> None:
    """`ep` as a scrape and epp's ledger would show it: `waiting` queued, `inflight` requests epp
    routed there and not yet completed, `kv` of its KV cache in use."""
    ep.metrics = dataclasses.replace(ep.metrics, waiting_queue_size=waiting, kv_cache_usage=kv)
    ep.inflight_requests = inflight


def set_loads(loads: tuple[tuple[Endpoint, int, int, float], ...]) -> None:
    for ep, waiting, inflight, kv in loads:
        set_load(ep, waiting, inflight, kv)


def ttft_s(waiting: int, uncached_chars: int) -> float:
    """The pool the model learns: 0.4 s a waiting request, 1 ms a token to prefill (4 bytes each)."""
    return 0.05 + 0.4 * waiting + uncached_chars / 4 / 1000


def trained_scheduler() -> tuple[Scheduler, list[Endpoint]]:
    """The config's scheduler after 96 responses on three pods with random queues."""
    scheduler = load_scheduler(CONFIG.read_text())
    producer = next(p for p in scheduler.producers if isinstance(p, PredictedLatencyProducer))
    pods = [make_endpoint(name) for name in ("a", "b", "c")]
    rng = random.Random(3)
    holds: set[tuple[str, int]] = set()
    for i in range(96):
        group, pod = rng.randrange(TAUGHT), rng.choice(pods)
        set_load(pod, rng.randrange(6))
        request = make_request(SYSTEM[group] + f"Question {i}?", request_id=f"teach-{i}")
        result = route(scheduler, [pod], request)
        uncached = len(request.prompt_text) - (len(SYSTEM[group]) if (pod.name, group) in holds else 0)
        first = ttft_s(pod.metrics.waiting_queue_size, uncached)
        producer.response_measured(request, pod, ResponseStats(first, first + 0.3, 10, True))
        complete(scheduler, request, result)
        holds.add((pod.name, group))
    for pod in pods:
        set_load(pod, 0)
    return scheduler, pods


def next_pod(scheduler: Scheduler, pods: list[Endpoint], group: int, i: int) -> str:
    request = make_request(SYSTEM[group] + f"Follow-up {i}?", request_id=f"q-{group}-{i}")
    result = route(scheduler, pods, request)
    complete(scheduler, request, result)
    return result.primary.endpoints[0].name


def test_a_group_stays_on_its_pod_until_the_wait_there_outweighs_a_cold_prefill() -> None:
    scheduler, (a, b, c) = trained_scheduler()
    # A fresh group goes to pod a and is served there once.
    fresh = make_request(SYSTEM[4] + "Fresh group?", request_id="fresh")
    complete(scheduler, fresh, route(scheduler, [a], fresh))
    # A burst at moderate load: a has one request waiting and is the busiest pod on every signal.
    # One queued request costs less than a cold prefill of the ~2,500-character prefix elsewhere,
    # so the affinity filter keeps the group on a, each time.
    moderate = ((a, 1, 4, 0.6), (b, 0, 2, 0.3), (c, 0, 2, 0.3))
    set_loads(moderate)
    assert {next_pod(scheduler, [a, b, c], 4, i) for i in range(5)} == {"a"}
    # The same state without the filter: the scorers alone would move the group (what the
    # filter's gate is there to prevent at moderate load).
    ungated = CONFIG.read_text().replace("  - pluginRef: prefix-cache-affinity-filter\n", "")
    assert ungated != CONFIG.read_text()
    plain = load_scheduler(ungated)
    complete(plain, fresh, route(plain, [a], fresh))
    set_loads(moderate)
    assert next_pod(plain, [a, b, c], 4, 50) in {"b", "c"}
    # A saturated a (eight waiting, seven in flight): the wait costs more than the cold prefill,
    # the filter opens and the request goes to another pod, which then holds the prefix too.
    set_loads(((a, 8, 7, 0.9), (b, 0, 2, 0.3), (c, 0, 2, 0.3)))
    assert next_pod(scheduler, [a, b, c], 4, 99) in {"b", "c"}


def test_until_the_model_has_learned_a_group_never_leaves_its_pod() -> None:
    scheduler = load_scheduler(CONFIG.read_text())
    a, b, c = (make_endpoint(name) for name in ("a", "b", "c"))
    first = make_request(SYSTEM[5] + "Hello?", request_id="first")
    complete(scheduler, first, route(scheduler, [a], first))
    set_load(a, 8, 7, 0.9)
    assert {next_pod(scheduler, [a, b, c], 5, i) for i in range(5)} == {"a"}
