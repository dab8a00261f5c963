"""One request's orchestration between the ext_proc stream and the scheduler.

The director picks candidates (ready endpoints, narrowed by Envoy's subset hint, fresh metrics
preferred), runs the scheduler, accounts the request in flight, and releases it when the
response completes. Protocol details stay in `epp.extproc`; scheduling details in `epp.scheduling`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.datastore import Datastore
from epp.errors import EppError, ErrorCode
from epp.framework import (
    DEFAULT_PREFIX_PRODUCER,
    DISAGG_DECISION_KEY,
    PREFIX_MATCH_DATA,
    CycleState,
    Endpoint,
    InferenceRequest,
    PrefixMatch,
    SchedulingResult,
    data_key,
)
from epp.observability import EppMetrics, ModelMetrics
from epp.scheduling.profile import plugin_name, plugin_type
from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

# Where the default prefix producer leaves its PrefixMatch, for the hit-ratio metric.
_DEFAULT_PREFIX_MATCH = data_key(PREFIX_MATCH_DATA, DEFAULT_PREFIX_PRODUCER)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class Decision:
    """A scheduled request, held by its stream until the response completes."""

    request: InferenceRequest
    result: SchedulingResult | None  # None for a headers-only request (no scheduling ran)
    endpoints: list[Endpoint]
    started: float
    metrics: ModelMetrics  # the request's model's metric children
    released: bool = False
    usage: Usage = field(default_factory=Usage)
    # The pre_request hooks run just after the reply; response_complete must not overtake them.
    pre_request_pending: bool = False

    @property
    def destination(self) -> str:
        """x-gateway-destination-endpoint: primary first, then fallbacks for Envoy's retries."""
        return ",".join(ep.key for ep in self.endpoints)


class Director:
    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        metrics: EppMetrics,
        staleness_threshold_s: float = 2.0,
        pool_name: str = "standalone",
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.metrics = metrics
        self.staleness_threshold_s = staleness_threshold_s
        self.pool_name = pool_name
        self._rng = random.Random()
        self._handler_labels = (plugin_name(scheduler.handler), plugin_type(scheduler.handler))
        datastore.subscribe(lambda ep: None, scheduler.endpoint_removed)

    def candidates(self, subset: Sequence[str] | None) -> list[Endpoint]:
        endpoints: Sequence[Endpoint] = self.datastore.endpoints()
        if subset is not None:
            # Envoy's subset hint names "ip:port" (or bare IPs): only those may serve.
            allowed = set(subset)
            endpoints = [ep for ep in endpoints if ep.key in allowed or ep.address in allowed]
        if not endpoints:
            raise EppError(ErrorCode.SERVICE_UNAVAILABLE, "no ready endpoint for this request")
        # Prefer endpoints whose metrics are fresh: a pod that stopped answering /metrics is likely
        # down or overloaded. When none are fresh (start-up, scraper lagging), use them all.
        cutoff = time.monotonic() - self.staleness_threshold_s
        fresh = [ep for ep in endpoints if ep.metrics.updated_at >= cutoff]
        return fresh if fresh else list(endpoints)

    def schedule(self, request: InferenceRequest, subset: Sequence[str] | None) -> Decision:
        """Raises EppError; the stream counts it (once, whatever raised)."""
        model_metrics = self.metrics.for_model(request.model, request.target_model)
        model_metrics.requests.inc()
        candidates = self.candidates(subset)
        cycle = CycleState()
        started = time.perf_counter()
        result = self.scheduler.schedule(cycle, request, candidates)
        self.metrics.scheduler_e2e.observe(time.perf_counter() - started)
        chosen = result.primary.endpoints
        decision = Decision(request, result, list(chosen), time.monotonic(), metrics=model_metrics)
        self._admit(decision)
        match: PrefixMatch | None = cycle.read(_DEFAULT_PREFIX_MATCH)
        if match is not None and match.total_blocks:
            self.metrics.prefix_indexer_hit_ratio.observe(match.ratio(chosen[0]))
        disagg = cycle.read(DISAGG_DECISION_KEY)
        if disagg is not None:  # a P/D handler decided: decode-only or prefill-decode
            self.metrics.count_disagg_decision(*self._handler_labels, request.target_model, disagg)
        # Recording the prompt's blocks for the chosen endpoint is not needed for the reply: do it
        # after the reply has been handed to gRPC.
        if self.scheduler.pre_request_hooks:
            decision.pre_request_pending = True
            asyncio.get_running_loop().call_soon(self._pre_request, decision, cycle)
        return decision

    def pick_any(self, request: InferenceRequest, subset: Sequence[str] | None) -> Decision:
        """Headers-only requests carry nothing to schedule on: least-loaded of the candidates."""
        model_metrics = self.metrics.for_model(request.model, request.target_model)
        model_metrics.requests.inc()
        candidates = self.candidates(subset)
        low = min(ep.active_requests for ep in candidates)
        endpoint = self._rng.choice([ep for ep in candidates if ep.active_requests == low])
        decision = Decision(request, None, [endpoint], time.monotonic(), metrics=model_metrics)
        self._admit(decision)
        return decision

    def _admit(self, decision: Decision) -> None:
        decision.endpoints[0].active_requests += 1
        decision.metrics.running.inc()

    def _pre_request(self, decision: Decision, cycle: CycleState) -> None:
        assert decision.result is not None
        decision.pre_request_pending = False
        self.scheduler.pre_request(cycle, decision.request, decision.result)
        if decision.released:  # the stream ended before this ran: complete it now, in order
            self.scheduler.response_complete(decision.request, decision.endpoints[0])

    def response_headers(self, decision: Decision) -> dict[str, str]:
        """Headers the plugins add to the client's response (e.g. a session token)."""
        if not self.scheduler.response_header_hooks:
            return {}
        return self.scheduler.response_headers(decision.request, decision.result, decision.endpoints[0])

    def release(self, decision: Decision, completed: bool) -> None:
        """The response ended (completed=True) or the stream went away. Idempotent."""
        if decision.released:
            return
        decision.released = True
        request, endpoint = decision.request, decision.endpoints[0]
        endpoint.active_requests = max(0, endpoint.active_requests - 1)
        m = decision.metrics
        m.running.dec()
        if completed:
            m.duration.observe(time.monotonic() - decision.started)
            if decision.usage.prompt_tokens:
                m.input_tokens.observe(decision.usage.prompt_tokens)
            if decision.usage.completion_tokens:
                m.output_tokens.observe(decision.usage.completion_tokens)
        if not decision.pre_request_pending:
            self.scheduler.response_complete(request, endpoint)

    def refresh_pool_metrics(self) -> None:
        endpoints = self.datastore.endpoints()
        name = self.pool_name
        self.metrics.pool_ready.labels(name).set(len(endpoints))
        if endpoints:
            n = len(endpoints)
            self.metrics.pool_kv_cache.labels(name).set(
                sum(ep.metrics.kv_cache_usage for ep in endpoints) / n
            )
            self.metrics.pool_queue.labels(name).set(
                sum(ep.metrics.waiting_queue_size for ep in endpoints) / n
            )
        size = 0
        for plugin in self.scheduler.plugins:
            index = getattr(plugin, "index", None)
            if index is not None and hasattr(index, "entries"):
                size += index.entries()
        self.metrics.prefix_indexer_size.set(size)
