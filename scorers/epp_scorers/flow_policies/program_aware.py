"""`program-aware-fairness`: fairness between programs (agentic workflows, tenants) by the service
each has received, not by turns.

A program is a fairness id (`x-llm-d-inference-fairness-id`, default `default-flow`): one flow of
each priority band. The policy keeps, per program, its attained service: the tokens its completed
responses used (input + 2 x output, from the model server's `usage`), decaying with a half-life
of `lasHalfLifeSeconds` of wall-clock time, so a program back from idling competes almost afresh.
When a band dispatches, each flow with requests waiting is scored (LAS, least attained service):

    score = lasWeightService x (1 - norm(service)) + lasWeightHeadWait x norm(head wait)

`norm` scales the value across the waiting flows to [0, 1] (0.5 for all when they are equal); the
highest score goes next (the flow that started waiting first on a tie). It also records each
program's mean queue wait, dispatched and in-flight requests. A program with nothing in flight
and no completion for `evictionTtlSeconds` is forgotten by a sweep every `evictionSweepSeconds`
(a supervised background task), and at most 10,000 are kept (the least recently active goes
first): memory and metric series stay bounded whatever ids clients send. A response that reports
no usage (a stream without `stream_options.include_usage`) counts no tokens.

    plugins:
    - type: program-aware-fairness
      parameters: {lasHalfLifeSeconds: 30}
    flowControl:
      defaultPriorityBand:
        fairnessPolicyRef: program-aware-fairness

Metrics (llm-d-router's names), read from the kept state when /metrics is scraped:
`llm_d_epp_program_aware_jains_fairness_index` (Jain's index over the programs' mean waits, 1.0
when equal), `llm_d_epp_program_aware_avg_wait_time_milliseconds{program_id}` and
`llm_d_epp_program_aware_attained_service_tokens{program_id}` (decayed to the scrape).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Self

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.framework import (
    BackgroundService,
    ConfigError,
    CycleState,
    Endpoint,
    FairnessPolicy,
    FlowQueue,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    PreRequest,
    ResponseComplete,
    ResponseMeasured,
    ResponseStats,
    SchedulingResult,
    ServiceContext,
    fairness_id,
)

# Programs kept at most (upstream keeps every program until its TTL): past it the least recently
# active one is forgotten, so ids a client makes up cannot grow memory or the metric series.
MAX_PROGRAMS = 10_000
# Output tokens cost about twice input tokens to serve (upstream's weights).
INPUT_TOKEN_WEIGHT = 1
OUTPUT_TOKEN_WEIGHT = 2

JAIN_INDEX_METRIC = "llm_d_epp_program_aware_jains_fairness_index"
AVG_WAIT_METRIC = "llm_d_epp_program_aware_avg_wait_time_milliseconds"
SERVICE_METRIC = "llm_d_epp_program_aware_attained_service_tokens"


@dataclass(slots=True)
class ProgramState:
    """What the policy knows of one program. Times are the policy's clock (time.monotonic)."""

    service: float  # attained service (weighted tokens), decayed up to `anchor`
    anchor: float
    last_completion: float  # seeded when first seen, so a program that never completes expires
    mean_wait_ms: float = 0.0  # over the requests it had waiting in flow control
    waits: int = 0
    dispatched: int = 0
    in_flight: int = 0
    completions: int = 0


class ProgramAwareFairness(FairnessPolicy, PreRequest, ResponseMeasured, ResponseComplete, BackgroundService):
    """Fairness between programs (fairness ids) by least attained service: the waiting flow whose
    program has used the fewest tokens lately (input + 2 x output, halving every
    `lasHalfLifeSeconds`) goes next, its head's wait breaking near-ties. Per-program state is
    bounded (idle programs evicted after `evictionTtlSeconds`; at most 10,000 kept)."""

    type_name = "program-aware-fairness"
    parameters = (
        ParamDoc("strategy", "string", "las", "The scoring strategy; only `las` (least attained service)."),
        ParamDoc(
            "lasWeightService",
            "float",
            "0.8",
            "Weight of the inverted attained service (>= 0): how strongly underserved programs go first.",
        ),
        ParamDoc(
            "lasWeightHeadWait",
            "float",
            "0.2",
            "Weight of the head request's wait (>= 0): the tie-breaker, e.g. on a cold start.",
        ),
        ParamDoc(
            "lasHalfLifeSeconds",
            "float",
            "60",
            "Half-life of attained service in wall-clock seconds (>= 0); 0: no decay (lifetime totals).",
        ),
        ParamDoc(
            "evictionTtlSeconds",
            "float",
            "3600",
            "A program with nothing in flight and no completion for this long is forgotten (>= 0; 0: never).",
        ),
        ParamDoc("evictionSweepSeconds", "float", "300", "How often idle programs are looked for (> 0)."),
    )

    def __init__(
        self,
        name: str = "",
        weight_service: float = 0.8,
        weight_head_wait: float = 0.2,
        half_life_s: float = 60.0,
        eviction_ttl_s: float = 3600.0,
        eviction_sweep_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        for key, value in (
            ("lasWeightService", weight_service),
            ("lasWeightHeadWait", weight_head_wait),
            ("lasHalfLifeSeconds", half_life_s),
            ("evictionTtlSeconds", eviction_ttl_s),
        ):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if eviction_sweep_s <= 0:
            raise ConfigError(f"evictionSweepSeconds must be > 0, got {eviction_sweep_s}")
        self.weight_service = weight_service
        self.weight_head_wait = weight_head_wait
        self.half_life_s = half_life_s
        self.eviction_ttl_s = eviction_ttl_s
        self.eviction_sweep_s = eviction_sweep_s
        self.clock = clock
        # Least recently active first (moved to the end on each use).
        self.programs: OrderedDict[str, ProgramState] = OrderedDict()

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        if "lasDecayFactor" in params:
            raise ConfigError("parameter 'lasDecayFactor' was removed upstream: set lasHalfLifeSeconds")
        params.get_str("strategy", "las", ("las",))
        plugin = cls(
            name,
            params.get_float("lasWeightService", 0.8),
            params.get_float("lasWeightHeadWait", 0.2),
            params.get_float("lasHalfLifeSeconds", 60.0),
            params.get_float("evictionTtlSeconds", 3600.0),
            params.get_float("evictionSweepSeconds", 300.0),
        )
        _ProgramMetrics.of(handle.registry).track(plugin)
        return plugin

    # --- per-program state ------------------------------------------------------------------------

    def program(self, program_id: str) -> ProgramState:
        """The program's state, made when first seen; marks it the most recently active."""
        state = self.programs.get(program_id)
        if state is None:
            now = self.clock()
            state = self.programs[program_id] = ProgramState(0.0, now, now)
            if len(self.programs) > MAX_PROGRAMS:
                self.programs.popitem(last=False)
        else:
            self.programs.move_to_end(program_id)
        return state

    def service(self, state: ProgramState, now: float) -> float:
        """The program's attained service with the decay up to `now` folded in."""
        if now > state.anchor:
            if self.half_life_s > 0 and state.service:
                state.service *= math.exp2((state.anchor - now) / self.half_life_s)
            state.anchor = now
        return state.service

    def evict_idle(self) -> int:
        """Forget programs with nothing in flight and no completion within the TTL; how many."""
        cutoff = self.clock() - self.eviction_ttl_s
        idle = [
            pid
            for pid, state in self.programs.items()
            if state.in_flight == 0 and state.last_completion < cutoff
        ]
        for pid in idle:
            del self.programs[pid]
        return len(idle)

    async def run(self, context: ServiceContext) -> None:
        if self.eviction_ttl_s <= 0:
            return  # no TTL: programs are forgotten only past MAX_PROGRAMS
        while True:
            await asyncio.sleep(self.eviction_sweep_s)
            self.evict_idle()

    # --- fairness ---------------------------------------------------------------------------------

    def pick(self, heads: Mapping[str, tuple[float, ...]], last: str | None) -> str:
        """Without the queues (a caller that has only the heads' keys): by attained service alone."""
        fids = list(heads)
        return fids[self._best(self._services(fids), None)]

    def pick_queue(self, queues: Mapping[str, FlowQueue], last: str | None) -> str:
        fids = list(queues)
        enqueued = [queue.head.enqueued for queue in queues.values()]
        i = self._best(self._services(fids), enqueued)
        # The chosen flow's head goes now: its wait counts toward the program's mean wait.
        state = self.programs.get(fids[i])
        if state is not None:
            state.waits += 1
            wait_ms = max(0.0, self.clock() - enqueued[i]) * 1000.0
            state.mean_wait_ms += (wait_ms - state.mean_wait_ms) / state.waits
        return fids[i]

    def _services(self, fids: list[str]) -> list[float]:
        """Each program's attained service now (made for a program not seen yet)."""
        now, programs, service = self.clock(), self.programs, self.service
        return [service(programs.get(fid) or self.program(fid), now) for fid in fids]

    def _best(self, services: list[float], enqueued: list[float] | None) -> int:
        """The index of the highest LAS score. With min-max normalisation the score is, up to a
        constant, -a x service - b x enqueued (an earlier head has waited longer), so one pass of
        arithmetic ranks the flows; a term whose values are all equal drops out (Go's 0.5 for all)."""
        s_lo, s_hi = min(services), max(services)
        a = self.weight_service / (s_hi - s_lo) if s_hi > s_lo else 0.0
        if enqueued is None:
            return services.index(s_lo) if a else 0
        e_lo, e_hi = min(enqueued), max(enqueued)
        b = self.weight_head_wait / (e_hi - e_lo) if e_hi > e_lo else 0.0
        scores = [-a * s - b * e for s, e in zip(services, enqueued, strict=True)]
        return scores.index(max(scores))  # the first of equal scores: it started waiting first

    # --- the request's life after dispatch --------------------------------------------------------

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        state = self.program(fairness_id(request.headers))
        state.dispatched += 1
        state.in_flight += 1

    def response_measured(self, request: InferenceRequest, endpoint: Endpoint, stats: ResponseStats) -> None:
        state = self.program(fairness_id(request.headers))
        cost = INPUT_TOKEN_WEIGHT * stats.input_tokens + OUTPUT_TOKEN_WEIGHT * stats.output_tokens
        self.service(state, self.clock())
        state.service += cost
        state.completions += 1

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        # Also when the stream went away (upstream counts only completed responses, so an
        # abandoned one kept its program in flight, and unevictable, for good).
        state = self.program(fairness_id(request.headers))
        state.in_flight = max(0, state.in_flight - 1)
        state.last_completion = self.clock()

    def fairness_index(self) -> float:
        """Jain's index over the mean waits of the programs that waited."""
        return jains_index([s.mean_wait_ms for s in self.programs.values() if s.waits])


def jains_index(values: list[float]) -> float:
    """Jain's fairness index: 1.0 when all values are equal (or fewer than two, or all 0), 1/n
    when one of n holds everything."""
    total, squares = sum(values), sum(v * v for v in values)
    if len(values) <= 1 or squares == 0:
        return 1.0
    return total * total / (len(values) * squares)


class _ProgramMetrics(Collector):
    """The program-aware gauges, computed from the policies' state when /metrics is scraped
    (nothing on the dispatch path); one collector per metrics registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _ProgramMetrics] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._policies: list[ProgramAwareFairness] = []

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _ProgramMetrics:
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls()
            registry.register(metrics)
        return metrics

    def track(self, policy: ProgramAwareFairness) -> None:
        self._policies.append(policy)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                JAIN_INDEX_METRIC,
                "[ALPHA] Jain's fairness index over average wait time across active programs.",
            ),
            GaugeMetricFamily(
                AVG_WAIT_METRIC,
                "[ALPHA] Cumulative mean of flow-control queue wait time per program in milliseconds.",
                labels=("program_id",),
            ),
            GaugeMetricFamily(
                SERVICE_METRIC,
                "[ALPHA] Time-decayed attained service (weighted tokens consumed) per program.",
                labels=("program_id",),
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        index, waits, services = self._families()
        means: list[float] = []
        seen: set[str] = set()  # a program in two policies is reported once (the first)
        for policy in self._policies:
            now = policy.clock()
            for pid, state in list(policy.programs.items()):
                if pid in seen:
                    continue
                seen.add(pid)
                if state.waits:
                    means.append(state.mean_wait_ms)
                if state.dispatched or state.waits:
                    waits.add_metric([pid], state.mean_wait_ms)
                if state.completions:
                    services.add_metric([pid], _decayed(policy, state, now))
        if self._policies:
            index.add_metric([], jains_index(means))
        yield index
        yield waits
        yield services


def _decayed(policy: ProgramAwareFairness, state: ProgramState, now: float) -> float:
    """The program's service decayed to `now`, without touching its state (a scrape reads only)."""
    if policy.half_life_s > 0 and now > state.anchor:
        return state.service * math.exp2(-(now - state.anchor) / policy.half_life_s)
    return state.service
