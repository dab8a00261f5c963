"""Helpers for testing scheduling plugins: build endpoints and requests, score, run a profile,
route through a whole config. Public and stable: third-party plugin packages use them in their
own unit tests.

    from epp.testing import make_endpoint, make_request, run_profile, score

    a = make_endpoint("a", waiting=3, kv=0.2)
    b = make_endpoint("b", waiting=0, kv=0.9)
    assert score(MyScorer(), [a, b]) == [0.8, 0.1]
    run = run_profile([(MyScorer(), 2.0), (QueueScorer(), 1.0)], [a, b])
    assert run.picked == ["b"] and run.scores["my-scorer"] == {"a": 0.8, "b": 0.1}

Endpoints are named; an endpoint's address is its name, so its key is `name:port`. Plugins that
read producers' data (prefix match, in-flight load) get the default producers automatically, as
the config loader would add them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from epp.config import load_config
from epp.framework import (
    ROLE_LABEL,
    Api,
    CycleState,
    DataConsumer,
    DataProducer,
    Endpoint,
    EndpointMetrics,
    Filter,
    InferenceRequest,
    Params,
    Picker,
    SchedulingResult,
    Scorer,
)
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.profile import SchedulerProfile, WeightedScorer, plugin_name
from epp.scheduling.registry import PluginRegistry, builtin_registry
from epp.scheduling.scheduler import Scheduler

__all__ = [
    "ProfileRun",
    "complete",
    "load_scheduler",
    "make_endpoint",
    "make_request",
    "route",
    "run_profile",
    "score",
]


def make_endpoint(
    name: str = "ep",
    *,
    waiting: int = 0,
    running: int = 0,
    kv: float = 0.0,
    labels: Mapping[str, str] | None = None,
    role: str | None = None,
    loras: Iterable[str] = (),
    waiting_loras: Iterable[str] = (),
    max_loras: int = 0,
    block_size: int | None = None,
    num_gpu_blocks: int | None = None,
    active_requests: int = 0,
    namespace: str = "",
    address: str | None = None,
    port: int = 8000,
    updated_at: float = 1.0,
) -> Endpoint:
    """An endpoint with the given scraped metrics (`waiting` queue, `running` requests, `kv` cache
    usage 0..1, LoRA adapters) and pod labels (`role` sets `llm-d.ai/role`)."""
    all_labels = dict(labels or {})
    if role is not None:
        all_labels[ROLE_LABEL] = role
    ep = Endpoint(address or name, port, name, all_labels, namespace=namespace)
    ep.metrics = EndpointMetrics(
        waiting_queue_size=waiting,
        running_requests=running,
        kv_cache_usage=kv,
        running_loras=frozenset(loras),
        waiting_loras=frozenset(waiting_loras),
        max_loras=max_loras,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        updated_at=updated_at,
    )
    ep.active_requests = active_requests
    return ep


def make_request(
    prompt: str = "Hello, world",
    *,
    model: str = "model",
    headers: Mapping[str, str] | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    body: Mapping[str, Any] | None = None,
    request_id: str = "test-request",
) -> InferenceRequest:
    """A completions request for `prompt`, or a chat request when `messages` is given. `body`
    adds fields (e.g. max_tokens, cache_salt). Header names are lower-cased, as Envoy sends them."""
    if messages is not None:
        api, text = Api.CHAT_COMPLETIONS, orjson.dumps(list(messages)).decode()
        full: dict[str, Any] = {"model": model, "messages": list(messages)}
    else:
        api, text = Api.COMPLETIONS, prompt
        full = {"model": model, "prompt": prompt}
    full.update(body or {})
    return InferenceRequest(
        request_id=request_id,
        model=model,
        api=api,
        prompt_text=text,
        headers={k.lower(): v for k, v in (headers or {}).items()},
        body=full,
        streaming=full.get("stream") is True,
    )


def _default_producers(plugins: Iterable[Any], registry: PluginRegistry | None = None) -> list[Any]:
    """Producers (default parameters) for the data `plugins` consume and do not produce."""
    registry = registry or builtin_registry()
    produced = {k for p in plugins if isinstance(p, DataProducer) for k in p.produces()}
    producers = []
    for plugin in plugins:
        if not isinstance(plugin, DataConsumer):
            continue
        for key in plugin.consumes():
            type_name = registry.default_producer(key)
            if key in produced or type_name is None:
                continue
            producer = registry.create(type_name, type_name, Params(None, type_name))
            producers.append(producer)
            produced.update(producer.produces())
    return producers


def score(
    scorer: Scorer,
    endpoints: Sequence[Endpoint],
    request: InferenceRequest | None = None,
    *,
    cycle: CycleState | None = None,
) -> list[float]:
    """The scorer's raw scores for `endpoints` (after running any producer it needs)."""
    request = request or make_request()
    cycle = cycle or CycleState()
    for producer in _default_producers([scorer]):
        producer.produce(cycle, request, endpoints)
    return list(scorer.score(cycle, request, endpoints))


class _Recording:
    """Wraps a scorer to keep what it returned."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.name = plugin_name(scorer)
        self.type_name = getattr(scorer, "type_name", type(scorer).__name__)
        self.endpoints: Sequence[Endpoint] = ()
        self.scores: list[float] = []

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]:
        self.endpoints = endpoints
        self.scores = list(self.scorer.score(cycle, request, endpoints))
        return self.scores


@dataclass
class ProfileRun:
    """The outcome of `run_profile`."""

    endpoints: list[Endpoint]  # what the picker chose, primary first (empty: filtered out)
    candidates: list[str] = field(default_factory=list)  # names of the endpoints left by the filters
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # scorer -> endpoint -> raw
    totals: dict[str, float] = field(default_factory=dict)  # endpoint -> sum of clamp(score) x weight
    cycle: CycleState = field(default_factory=CycleState)

    @property
    def picked(self) -> list[str]:
        return [ep.name for ep in self.endpoints]


def run_profile(
    scorers: Sequence[tuple[Scorer, float]],
    endpoints: Sequence[Endpoint],
    request: InferenceRequest | None = None,
    *,
    picker: Picker | None = None,
    filters: Sequence[Filter] = (),
    producers: Sequence[DataProducer] = (),
    seed: int | None = 0,
) -> ProfileRun:
    """Run one scheduling profile (filters, weighted scorers, picker) over `endpoints`.

    `picker` defaults to max-score-picker with a seeded random tie-break. Producers the plugins need
    are added (pass your own in `producers` to keep their state, e.g. a prefix index, between
    calls)."""
    request = request or make_request()
    recorders = [(_Recording(s), w) for s, w in scorers]
    plugins = [*filters, *(s for s, _ in scorers), *producers]
    cycle = CycleState()
    for producer in [*producers, *_default_producers(plugins)]:
        producer.produce(cycle, request, endpoints)
    chosen_picker = picker or MaxScorePicker(params=None, rng=random.Random(seed))
    profile = SchedulerProfile("test", filters, [WeightedScorer(r, w) for r, w in recorders], chosen_picker)
    result = profile.run(cycle, request, endpoints)
    run = ProfileRun(endpoints=list(result.endpoints) if result else [], cycle=cycle)
    if result is None:
        return run
    candidates: Sequence[Endpoint] = recorders[0][0].endpoints if recorders else endpoints
    run.candidates = [ep.name for ep in candidates]
    totals = [0.0] * len(candidates)
    for recorder, weight in recorders:
        run.scores[recorder.name] = {ep.name: s for ep, s in zip(candidates, recorder.scores, strict=True)}
        totals = [t + weight * min(1.0, max(0.0, s)) for t, s in zip(totals, recorder.scores, strict=True)]
    run.totals = {ep.name: t for ep, t in zip(candidates, totals, strict=True)}
    return run


def load_scheduler(config_yaml: str, registry: PluginRegistry | None = None) -> Scheduler:
    """The scheduler an EndpointPickerConfig describes; in-tree plugins plus those installed
    through the `epp.plugins` entry points."""
    if registry is None:
        registry = builtin_registry()
        registry.load_entry_points()
    return load_config(config_yaml, registry, "test config").scheduler


def route(scheduler: Scheduler, endpoints: Sequence[Endpoint], request: InferenceRequest) -> SchedulingResult:
    """Schedule one request and run the after-pick hooks (e.g. the prefix index learns where the
    prompt went), as epp does for a real request. Raises EppError when nothing can serve it."""
    cycle = CycleState()
    result = scheduler.schedule(cycle, request, endpoints)
    scheduler.pre_request(cycle, request, result)
    return result


def complete(scheduler: Scheduler, request: InferenceRequest, result: SchedulingResult) -> None:
    """The response of a routed request completed (in-flight counts drop)."""
    scheduler.response_complete(request, result.primary.endpoints[0])
