"""One request's orchestration between the ext_proc stream and the scheduler.

The director picks candidates (ready endpoints, narrowed by Envoy's subset hint, fresh metrics
preferred), runs the scheduler, charges the request to the in-flight ledger, moves the charge
when Envoy reports that a fallback served, and releases it when the response completes. It
records the request's metrics (epp.observability) and its scheduling trace span (epp.tracing).
Protocol details stay in `epp.extproc`; scheduling in `epp.scheduling`; what a plugin does with
a request is the plugin's business (the director knows none by name).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from epp.datalayer.datastore import Datastore
from epp.discovery.rewrites import REWRITE_HEADERS, RewriteStore
from epp.errors import DROPPED_NO_ENDPOINTS, DROPPED_SATURATED
from epp.flowcontrol.admission import Admission
from epp.framework import (
    Admitter,
    CycleState,
    Endpoint,
    EppError,
    ErrorCode,
    InferenceRequest,
    InFlightLedger,
    ProfileResult,
    ResponseStats,
    SchedulingResult,
    metric_columns,
)
from epp.observability import DEFAULT_PRIORITY, EppMetrics, PoolSummary, RequestMetrics, fairness_id
from epp.requestcontrol.usage import Usage
from epp.scheduling.scheduler import PROFILE_RUNS, Scheduler
from epp.tracing import RequestTracer

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)
# --emit-served-endpoint-header: the response header naming the endpoint that served (ip:port).
# The name of the envoy.lb key Envoy reports the same thing under; upstream has no such header.
SERVED_ENDPOINT_HEADER = "x-gateway-destination-endpoint-served"


@dataclass(slots=True)
class Decision:
    """A scheduled request, held by its stream until the response completes."""

    request: InferenceRequest
    result: SchedulingResult | None  # None for a headers-only request (no scheduling ran)
    endpoints: list[Endpoint]  # primary first, then fallbacks
    started: float  # time.perf_counter() when the request arrived (its headers)
    metrics: RequestMetrics  # the request's metric children
    released: bool = False
    usage: Usage = field(default_factory=Usage)
    # The pre_request hooks run just after the reply, with the cycle state of the pick (dropped
    # once they ran); nothing later in the request may overtake them.
    pending_cycle: CycleState | None = None
    served: Endpoint | None = None  # the endpoint that served, once Envoy said (else the primary)
    # The response, as the stream sees it pass (for TTFT, inter-token latency, sizes).
    streaming: bool = False  # the model server streams (stream: true, or an event-stream reply)
    first_chunk: float = 0.0  # perf_counter() of the first non-empty response body chunk
    last_chunk: float = 0.0
    response_bytes: int = 0
    # A headers-only request's routing headers (the profile handler's, as for a scheduled one).
    headers: Mapping[str, str | None] | None = None
    # What was measured of a completed response, for the ResponseMeasured hooks (None: none).
    stats: ResponseStats | None = None

    def response_chunk(self, size: int, now: float) -> None:
        """A response body chunk of `size` bytes went by at `now`."""
        self.response_bytes += size
        if not self.first_chunk:
            self.first_chunk = now
        elif self.streaming:
            self.metrics.itl.observe(now - self.last_chunk)
        self.last_chunk = now

    @property
    def destination(self) -> str:
        """x-gateway-destination-endpoint: primary first, then fallbacks for Envoy's retries."""
        return ",".join(ep.key for ep in self.endpoints)

    @property
    def serving_endpoint(self) -> Endpoint:
        return self.served if self.served is not None else self.endpoints[0]


def _host_of(entry: str) -> str:
    """The IP of a subset-hint entry: "10.0.0.1:8000" -> "10.0.0.1", "[fd00::1]:8000" -> "fd00::1",
    a bare IP as it is."""
    entry = entry.strip()
    if entry.startswith("["):
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry  # a bare IPv4 or IPv6 address


class Director:
    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        metrics: EppMetrics,
        ledger: InFlightLedger,
        staleness_threshold_s: float = 2.0,
        pool_name: str = "standalone",
        use_subset_hint: bool = True,
        emit_scores: bool = False,
        served_endpoint_header: bool = False,
        tracer: RequestTracer | None = None,
        grpc_stream_metrics: bool = False,
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.metrics = metrics
        self.ledger = ledger
        self.staleness_threshold_s = staleness_threshold_s
        # The fresh endpoints of the pool's tuple, as a tuple, while the same ones are stale: the
        # plugins' caches key on a tuple's identity (filters, metric rows, session names).
        self._fresh_kept: tuple[tuple[Endpoint, ...], bytes, tuple[Endpoint, ...]] | None = None
        # ... and the pool narrowed by the last subset hint (Envoy sends the same one again and again).
        self._subset_kept: tuple[tuple[Endpoint, ...], tuple[str, ...], tuple[Endpoint, ...]] | None = None
        self.pool_name = pool_name
        self.use_subset_hint = use_subset_hint  # --disable-endpoint-subset-filter turns it off
        self.emit_scores = emit_scores  # --emit-endpoint-scores
        self.served_endpoint_header = served_endpoint_header  # --emit-served-endpoint-header
        self.tracer = tracer  # --tracing with an OTEL exporter configured; None: no spans
        if grpc_stream_metrics:  # --enable-grpc-stream-metrics
            metrics.enable_stream_metrics()
        self._rng = random.Random()
        # Admission before scheduling (docs/flow-control.md): None, or inactive, costs nothing.
        self.admission: Admission | None = None
        self.admits = False  # the request path awaits `admit` (a plain attribute: read per message)
        self.admitters: list[Admitter] = []  # admitter plugins, run on the candidates
        # InferenceModelRewrites (epp.discovery.rewrites): the model a request is sent to.
        self.rewrites: RewriteStore | None = None
        datastore.subscribe(lambda ep: None, scheduler.endpoint_removed)
        metrics.watch_endpoints(pool_name, datastore.endpoints)

    @property
    def tracer(self) -> RequestTracer | None:
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: RequestTracer | None) -> None:
        self._tracer = tracer
        self.scheduler.trace_profiles = tracer is not None  # time each profile for its span

    def candidates(self, subset: Sequence[str] | None) -> tuple[Endpoint, ...]:
        """The endpoints a request may go to, as a tuple plugins may cache on: the datastore's
        endpoint tuple itself when nothing narrows it (the scorers then read its metric columns
        without a gather), else one tuple for as long as the same hint and stale endpoints hold."""
        pool = self.datastore.endpoints()
        endpoints = pool
        if subset is not None and self.use_subset_hint:
            endpoints = self._narrowed(pool, tuple(subset))
        if not endpoints:
            raise EppError(
                ErrorCode.SERVICE_UNAVAILABLE, "no ready endpoint for this request", DROPPED_NO_ENDPOINTS
            )
        # Prefer endpoints whose metrics are fresh: a pod that stopped answering /metrics is likely
        # down or overloaded. When none are fresh (start-up, scraper lagging), use them all.
        fresh = metric_columns(endpoints).updated_at >= time.monotonic() - self.staleness_threshold_s
        count = np.count_nonzero(fresh)  # one C call (all() and any() are two Python wrappers)
        if count == len(endpoints) or not count:
            return endpoints
        # The pool less its stale endpoints: the same tuple request after request while the same
        # ones are stale (a pod down is the common case of this branch).
        mask = fresh.tobytes()
        kept = self._fresh_kept
        if kept is not None and kept[0] is endpoints and kept[1] == mask:
            return kept[2]
        chosen = tuple(endpoints[i] for i in fresh.nonzero()[0].tolist())
        self._fresh_kept = (endpoints, mask, chosen)
        return chosen

    def _narrowed(self, pool: tuple[Endpoint, ...], subset: tuple[str, ...]) -> tuple[Endpoint, ...]:
        """The pool narrowed by Envoy's subset hint, the same tuple for the same hint and pool.
        The hint names "ip:port" entries; as in the Go EPP only the IP counts, so every port of a
        named pod is a candidate."""
        kept = self._subset_kept
        if kept is not None and kept[0] is pool and kept[1] == subset:
            return kept[2]
        allowed = {_host_of(entry) for entry in subset}
        chosen = tuple(ep for ep in pool if ep.address in allowed)
        self._subset_kept = (pool, subset, chosen)
        return chosen

    def schedule(
        self,
        request: InferenceRequest,
        subset: Sequence[str] | None,
        *,
        received: float | None = None,
        request_size: int = 0,
        span: Span | None = None,
    ) -> Decision:
        """Raises EppError; the stream counts it (once, whatever raised). `received` is when the
        request arrived (perf_counter), `request_size` its body's bytes, `span` the stream's
        trace span (the scheduling span is its child)."""
        tracer = self._tracer
        orchestration = tracer.start_orchestration(span, request, 0) if tracer is not None else None
        cycle = CycleState()
        candidates: Sequence[Endpoint] = ()
        result: SchedulingResult | None = None
        try:
            candidates = self.candidates(subset)
            started = time.perf_counter()
            if self.admitters:
                # Go's order: the data producers, then the admitters (they may read the producers'
                # data), then the profiles. A refusal is not a scheduling attempt.
                self.scheduler.produce(cycle, request, candidates)
                self._run_admitters(cycle, request, candidates)
            try:
                if self.admitters:
                    result = self.scheduler.run_profiles(cycle, request, candidates)
                else:
                    result = self.scheduler.schedule(cycle, request, candidates)
            except Exception:
                self.metrics.count_schedule_attempt(request.target_model, None)
                raise
            finally:
                self.metrics.scheduler_e2e.observe(time.perf_counter() - started)
            self.metrics.count_schedule_attempt(request.target_model, result.primary.endpoints[0])
            if orchestration is not None and tracer is not None:
                runs = cycle.read(PROFILE_RUNS)
                tracer.record_scheduling(
                    orchestration, len(candidates), runs, result, result.primary.endpoints
                )
        except Exception as exc:
            if orchestration is not None and tracer is not None:
                tracer.record_scheduling(orchestration, len(candidates), cycle.read(PROFILE_RUNS), None)
                tracer.fail(orchestration, exc, exc.message if isinstance(exc, EppError) else repr(exc))
            raise
        finally:
            if orchestration is not None:
                orchestration.end()
        metrics = self.metrics.for_request(
            request.model, request.target_model, fairness_id(request.headers), self._priority(request)
        )
        metrics.requests.inc()
        metrics.request_size.observe(request_size)
        decision = Decision(
            request,
            result,
            list(result.primary.endpoints),
            time.perf_counter() if received is None else received,
            metrics,
            streaming=request.streaming,
        )
        self._admit(decision, result.targets())
        # What plugins do after the pick (e.g. the prefix index learning where the prompt went) is
        # not needed for the reply: run it after the reply has been handed to gRPC.
        if self.scheduler.pre_request_hooks:
            decision.pending_cycle = cycle
            asyncio.get_running_loop().call_soon(self._pre_request, decision)
        return decision

    async def admit(self, headers: Mapping[str, str], byte_size: int, request_id: str) -> None:
        """Wait until the request may be scheduled (flow control), or raise EppError (429 / 503).
        Called only when `self.admission` is active."""
        if self.admission is not None:
            await self.admission.admit(headers, byte_size, request_id)

    def rewrite_model(self, request: InferenceRequest) -> bool:
        """The model the request goes to, resolved as the Go EPP does before scheduling: an
        InferenceModelRewrite rule for its model (a target drawn by weight), else the
        x-llm-d-model-name-rewrite header. It becomes the request's target_model (what scheduling
        and the metrics see) and its body's `model`. True when the body forwarded must change."""
        rule = self.rewrites.rule_for(request.model) if self.rewrites is not None else None
        target = ""
        if rule is not None:
            target = rule.choose(self._rng)
            self.metrics.count_rewrite(rule.source, request.model, target)
        else:
            for name in REWRITE_HEADERS:
                target = request.headers.get(name, "")
                if target:
                    break
        if not target or target == request.model:
            return False
        request.target_model = target
        request.body = {**request.body, "model": target}  # a shallow copy: the top level only
        return True

    def _priority(self, request: InferenceRequest) -> str:
        """The request's priority label: its InferenceObjective's (0 without one)."""
        if self.admission is None or not len(self.admission.objectives):
            return DEFAULT_PRIORITY
        return str(self.admission.objectives.priority(request.headers))

    def use_admission(self, admission: Admission) -> None:
        """Admit requests through `admission`; `admits` follows whether it is active."""
        self.admission = admission
        admission.listeners.append(self._set_admits)
        self._set_admits(admission.active)

    def _set_admits(self, active: bool) -> None:
        self.admits = active

    def _run_admitters(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> None:
        priority = self.admission.objectives.priority(request.headers) if self.admission is not None else 0
        for admitter in self.admitters:
            reason = admitter.admit_with_data(cycle, request, priority, candidates)
            if reason is not None:
                raise EppError(ErrorCode.RESOURCE_EXHAUSTED, reason, DROPPED_SATURATED)

    def pick_any(
        self, request: InferenceRequest, subset: Sequence[str] | None, *, received: float | None = None
    ) -> Decision:
        """A headers-only request (GET /v1/models, ...) carries no prompt to score, but it goes
        through the same filters as any other: those of the profile the profile handler makes
        primary among the ones it runs first (for P/D, decode: never a prefill pod). Of the
        endpoints left, the one with the fewest requests in flight, ties at random. The handler's
        routing headers apply (P/D removes a client's x-prefiller-host-port). No producer, scorer
        or lifecycle hook runs. Raises EppError: 503 with no candidate, 429 when the filters leave
        none (as the scheduler does)."""
        candidates = self.candidates(subset)
        scheduler = self.scheduler
        handler = scheduler.handler
        cycle = CycleState()
        names = handler.pick_profiles(cycle, request, list(scheduler.profiles), {})
        results: dict[str, ProfileResult | None] = {}
        for name in names or list(scheduler.profiles)[:1]:
            profile = scheduler.profiles.get(name)
            if profile is None:
                continue
            left: Sequence[Endpoint] = candidates
            for flt in profile.filters:
                left = flt.filter(cycle, request, left)
                if not left:
                    break
            if left:
                low = min(ep.inflight_requests for ep in left)
                chosen = self._rng.choice([ep for ep in left if ep.inflight_requests == low])
                results[name] = ProfileResult(name, [chosen], left)
            else:
                results[name] = None
        primary = handler.primary_profile(results) if results else ""
        primary_result = results.get(primary)
        if primary_result is None or not primary_result.endpoints:
            raise EppError(
                ErrorCode.RESOURCE_EXHAUSTED, "no endpoint passed the filters of profile " + primary
            )
        endpoint = primary_result.endpoints[0]
        # Only the primary's pick: a request with no prompt is never disaggregated.
        headers = handler.routing_headers(request, SchedulingResult(primary, {primary: primary_result}))
        metrics = self.metrics.for_request(
            request.model, request.target_model, fairness_id(request.headers), self._priority(request)
        )
        metrics.requests.inc()
        started = time.perf_counter() if received is None else received
        decision = Decision(request, None, [endpoint], started, metrics, headers=headers)
        self._admit(decision, [endpoint])
        return decision

    def _admit(self, decision: Decision, targets: Sequence[Endpoint]) -> None:
        self.ledger.charge(decision.request, targets)
        if decision.metrics.running is not None:
            decision.metrics.running.inc()

    def _pre_request(self, decision: Decision) -> None:
        """Run the pre_request hooks once (scheduled after the reply, or earlier if the response
        overtakes them); if the stream already ended, complete the request now, in order."""
        cycle, decision.pending_cycle = decision.pending_cycle, None
        if cycle is None or decision.result is None:
            return
        self.scheduler.pre_request(cycle, decision.request, decision.result)
        if decision.released:
            self._complete(decision)

    def response_headers(self, decision: Decision, served_key: str | None) -> dict[str, str]:
        """The model server answered. `served_key` is the endpoint Envoy reports it sent the request
        to (`envoy.lb` / `x-gateway-destination-endpoint-served`), when it says. Returns the headers
        plugins add to the client's response (e.g. a session token)."""
        if served_key:
            self._note_served(decision, served_key)
        endpoint = decision.serving_endpoint
        added: dict[str, str] = {}
        if self.scheduler.response_header_hooks:
            added = self.scheduler.response_headers(decision.request, decision.result, endpoint)
        if self.served_endpoint_header:
            # Which pod answered, for clients measuring stickiness (epp_bench report); Envoy's
            # report when it gave one, else epp's pick. Set last: a plugin cannot mask it.
            added[SERVED_ENDPOINT_HEADER] = endpoint.key
        return added

    def _note_served(self, decision: Decision, served_key: str) -> None:
        planned = decision.endpoints[0]
        if served_key == planned.key or decision.served is not None or decision.released:
            return
        served = self._endpoint_for(decision, served_key)
        if served is None:
            log.debug(
                "request %s served by %s, which epp does not know", decision.request.request_id, served_key
            )
            return
        decision.served = served
        if decision.result is not None:
            # The hooks record the primary (its token estimate on the charge among them) before
            # the charge and their state move.
            self._pre_request(decision)
        if self.ledger.move(decision.request, planned, served):
            self.metrics.fallback_served.inc()
        if decision.result is not None:
            self.scheduler.served_elsewhere(decision.request, planned, served)

    def _endpoint_for(self, decision: Decision, key: str) -> Endpoint | None:
        for ep in decision.endpoints:
            if ep.key == key:
                return ep
        return self.datastore.get(key)

    def release(self, decision: Decision, completed: bool) -> None:
        """The response ended (completed=True) or the stream went away. Idempotent."""
        if decision.released:
            return
        decision.released = True
        self.ledger.release(decision.request)
        if self.admission is not None and self.admission.controller is not None:
            self.admission.controller.wake()  # capacity freed: a queued request may go
        m = decision.metrics
        if m.running is not None:
            m.running.dec()
        if completed:
            now = time.perf_counter()
            self._observe_response(decision, now)
            if self.scheduler.response_measured_hooks and decision.result is not None:
                decision.stats = ResponseStats(
                    decision.first_chunk - decision.started if decision.first_chunk else 0.0,
                    now - decision.started,
                    decision.usage.completion_tokens,
                    decision.streaming,
                    decision.usage.prompt_tokens,
                )
        if decision.pending_cycle is None and decision.result is not None:
            self._complete(decision)  # (a headers-only request ran no hook: none ends for it)

    def _complete(self, decision: Decision) -> None:
        """The completion hooks: what was measured of the response (if it completed), then the end."""
        if decision.stats is not None:
            self.scheduler.response_measured(decision.request, decision.serving_endpoint, decision.stats)
        self.scheduler.response_complete(decision.request, decision.serving_endpoint)

    @staticmethod
    def _observe_response(decision: Decision, now: float) -> None:
        """A completed response's metrics, as the Go EPP records them at its end."""
        m = decision.metrics
        e2e = now - decision.started
        m.duration.observe(e2e)
        m.response_size.observe(decision.response_bytes)
        usage = decision.usage
        if usage.prompt_tokens > 0:
            m.input_tokens.observe(usage.prompt_tokens)
        output = usage.completion_tokens
        if output > 0:
            m.output_tokens.observe(output)
            m.ntpot.observe(e2e / output)
        if usage.cached_tokens > 0:
            m.cached_tokens.observe(usage.cached_tokens)
        first = decision.first_chunk
        if not first:
            return  # no response body: no first token
        if decision.streaming:
            ttft = first - decision.started
            m.ttft(True).observe(ttft)
            if output > 1 and now > first:
                m.tpot.observe((e2e - ttft) / (output - 1))
        else:  # the Go EPP reads a non-streaming body whole: its first token is its end
            m.ttft(False).observe(e2e)

    def refresh_pool_metrics(self) -> None:
        """The pool gauges, over the endpoints whose metrics are fresh (as the Go EPP counts its
        ready endpoints)."""
        cutoff = time.monotonic() - self.staleness_threshold_s
        fresh = [ep for ep in self.datastore.endpoints() if ep.metrics.updated_at >= cutoff]
        self.metrics.set_pool(self.pool_name, PoolSummary(fresh))
