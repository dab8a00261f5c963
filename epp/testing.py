"""Helpers for testing scheduling plugins: build endpoints, requests and plugins, score, run a
profile, route through a whole config. Public and stable: third-party plugin packages use them
in their own unit tests.

    from epp.testing import build, make_endpoint, make_request, run_profile, score

    a = make_endpoint("a", waiting=3, kv=0.2)
    b = make_endpoint("b", waiting=0, kv=0.9)
    mine = build(MyScorer, {"threshold": 4})       # parsed as the config loader would
    assert score(mine, [a, b]) == [0.8, 0.1]
    run = run_profile([(mine, 2.0), (build(QueueScorer), 1.0)], [a, b])
    assert run.picked == ["b"] and run.scores["my-scorer"] == {"a": 0.8, "b": 0.1}

Endpoints are named; an endpoint's address is its name, so its key is `name:port`. Plugins that
read producers' data (prefix match, in-flight load) get the default producers automatically, as
the config loader would add them. Plugins come from the installed `epp.plugins` entry points.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from epp.framework import (
    ROLE_LABEL,
    Api,
    ConfigError,
    CycleState,
    DataProducer,
    Endpoint,
    EndpointMetrics,
    Filter,
    InferenceRequest,
    Params,
    Picker,
    Plugin,
    PluginHandle,
    PluginRegistry,
    SchedulingResult,
    Scorer,
)
from epp.framework.registry import installed_registry
from epp.scheduling.loader import load_config
from epp.scheduling.profile import SchedulerProfile, WeightedScorer
from epp.scheduling.scheduler import Scheduler

__all__ = [
    "ProfileRun",
    "build",
    "complete",
    "load_scheduler",
    "make_endpoint",
    "make_request",
    "plugin_class",
    "route",
    "run_profile",
    "score",
]

P = TypeVar("P", bound=Plugin)

_registry: PluginRegistry | None = None


def _installed() -> PluginRegistry:
    global _registry  # the entry points are read once per process
    if _registry is None:
        _registry = installed_registry()
    return _registry


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
    inflight_requests: int = 0,
    inflight_tokens: int = 0,
    namespace: str = "",
    address: str | None = None,
    port: int = 8000,
    updated_at: float = 1.0,
) -> Endpoint:
    """An endpoint with the given scraped metrics (`waiting` queue, `running` requests, `kv` cache
    usage 0..1, LoRA adapters), in-flight counts and pod labels (`role` sets `llm-d.ai/role`)."""
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
    ep.inflight_requests = inflight_requests
    ep.inflight_tokens = inflight_tokens
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


def plugin_class(type_name: str) -> type[Plugin]:
    """The installed plugin class registered under `type_name`."""
    cls = _installed().get(type_name)
    if cls is None:
        raise KeyError(f"no installed plugin type {type_name!r}")
    return cls


def build(
    cls: type[P] | str,
    parameters: Mapping[str, Any] | None = None,
    *,
    name: str = "",
    handle: PluginHandle | None = None,
) -> P:
    """A plugin built from a config's `parameters` exactly as the loader builds it (so a bad or
    unknown parameter raises ConfigError). `cls` is a class or an installed type name."""
    klass: Any = plugin_class(cls) if isinstance(cls, str) else cls
    name = name or klass.type_name
    params = Params(parameters, name)
    plugin: P = klass.from_params(name, params, handle or PluginHandle())
    unread = params.unread()
    if unread:
        raise ConfigError(f"unknown parameter {unread[0]!r}")
    return plugin


def _default_producers(plugins: Iterable[Plugin], handle: PluginHandle) -> list[DataProducer]:
    """Producers (default parameters) for the data `plugins` consume and do not produce."""
    registry = _installed()
    produced = {k for p in plugins if isinstance(p, DataProducer) for k in p.produces()}
    producers: list[DataProducer] = []
    for plugin in plugins:
        for key in plugin.consumes():
            type_name = registry.default_producer(key)
            if key in produced or type_name is None:
                continue
            producer: Plugin = build(type_name, handle=handle)
            assert isinstance(producer, DataProducer)
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
    for producer in _default_producers([scorer], PluginHandle()):
        producer.produce(cycle, request, endpoints)
    return [float(s) for s in scorer.score(cycle, request, endpoints)]


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
    calls). The scores are the ones the profile recorded, as epp's debug log shows them."""
    request = request or make_request()
    plugins: list[Plugin] = [*filters, *(s for s, _ in scorers), *producers]
    cycle = CycleState()
    for producer in [*producers, *_default_producers(plugins, PluginHandle())]:
        producer.produce(cycle, request, endpoints)
    if picker is None:
        max_score: Any = plugin_class("max-score-picker")
        picker = max_score(rng=random.Random(seed))
        assert isinstance(picker, Picker)
    profile = SchedulerProfile("test", filters, [WeightedScorer(s, w) for s, w in scorers], picker)
    result = profile.run(cycle, request, endpoints)
    run = ProfileRun(endpoints=list(result.endpoints) if result else [], cycle=cycle)
    if result is None:
        return run
    run.candidates = [ep.name for ep in result.candidates]
    run.scores = {
        scorer: {ep.name: float(s) for ep, s in zip(result.candidates, values, strict=True)}
        for scorer, values in result.scorer_scores.items()
    }
    run.totals = {ep.name: float(t) for ep, t in zip(result.candidates, result.totals, strict=True)}
    return run


def load_scheduler(config_yaml: str, registry: PluginRegistry | None = None) -> Scheduler:
    """The scheduler an EndpointPickerConfig describes; in-tree plugins plus those installed
    through the `epp.plugins` entry points. Its plugins share `scheduler.handle` (metrics registry,
    in-flight ledger)."""
    return load_config(config_yaml, registry or _installed(), "test config").scheduler


def route(scheduler: Scheduler, endpoints: Sequence[Endpoint], request: InferenceRequest) -> SchedulingResult:
    """Schedule one request, charge it to the in-flight ledger and run the after-pick hooks (e.g.
    the prefix index learns where the prompt went), as epp does for a real request. Raises
    EppError when nothing can serve it."""
    cycle = CycleState()
    result = scheduler.schedule(cycle, request, endpoints)
    scheduler.handle.ledger.charge(request, result.targets())
    scheduler.pre_request(cycle, request, result)
    return result


def complete(scheduler: Scheduler, request: InferenceRequest, result: SchedulingResult) -> None:
    """The response of a routed request completed: its in-flight charge is released."""
    scheduler.handle.ledger.release(request)
    scheduler.response_complete(request, result.primary.endpoints[0])
