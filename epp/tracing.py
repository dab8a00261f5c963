"""OpenTelemetry traces of each request, named as the Go EPP (llm-d-router) names its spans.

`--tracing` (default true) with the standard OTEL_* environment. Spans are exported when an
exporter is configured: `OTEL_TRACES_EXPORTER=otlp` (OTLP over gRPC, as the Go EPP; endpoint,
TLS, headers and timeout from `OTEL_EXPORTER_OTLP_[TRACES_]*`, default `localhost:4317`
plaintext), `console` (stdout), or, with the variable unset, OTLP whenever
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. Otherwise nothing is
traced, and the OpenTelemetry SDK is not even imported (epp starts as fast as without it).
Sampling: `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, by default the Go EPP's
`parentbased_traceidratio` at 0.1. Resource: `service.name` `llm-d-epp` (the Go EPP's), the
version, then `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`.

Per request (each ext_proc stream):

- `gateway.request` (server span, scope `llm-d-router/pkg/epp/handlers`): the whole stream, a
  child of the caller's trace when the request headers carry W3C `traceparent` / `baggage`.
  An error the client sees sets its status to ERROR with the message.
- `gateway.request_orchestration` (server span, scope `llm-d-router/pkg/epp/requestcontrol`):
  scheduling, with the result: the primary profile, the endpoints chosen (primary first, then
  fallbacks), how many candidates there were, the model and the request id.
- `run_scheduler_profile` (internal, scope `llm-d-router/pkg/epp/scheduling`), one per profile
  that ran, with its real start and end: candidates in and after the filters, the scorers with
  each one's max and mean score, the top-scored endpoints with their weighted scores (the Go
  EPP's `llm_d.epp.picker.top_*`) and what the picker chose.

Attribute names are the Go EPP's where it has one (`llm_d.epp.*`, `gen_ai.request.*`,
`target_model`, `request_prio`); epp's additions are under `llm_d.epp.scheduling.*` and
`llm_d.epp.scoring.*` (docs/metrics.md lists them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from epp import __version__
from epp.framework import Endpoint, InferenceRequest, ProfileResult, SchedulingResult

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

SERVICE_NAME = "llm-d-epp"  # the Go EPP's default service.name
HANDLERS_SCOPE = "llm-d-router/pkg/epp/handlers"
REQUEST_CONTROL_SCOPE = "llm-d-router/pkg/epp/requestcontrol"
SCHEDULING_SCOPE = "llm-d-router/pkg/epp/scheduling"

REQUEST_SPAN = "gateway.request"
ORCHESTRATION_SPAN = "gateway.request_orchestration"
PROFILE_SPAN = "run_scheduler_profile"

DEFAULT_SAMPLER_RATIO = 0.1  # the Go EPP's parentbased_traceidratio default
TOP_ENDPOINTS = 5  # the Go EPP's maxTracedEndpointScores

# (profile name, start ns, end ns, its result or None when its filters left nothing), in the
# order the profiles ran: what the scheduler records when tracing is on.
ProfileRun = tuple[str, int, int, ProfileResult | None]

_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def exporters_from_env(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the OTEL_* environment asks for: "otlp", "console", or none."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        return ["otlp"] if any(environ.get(var) for var in _OTLP_ENDPOINT_VARS) else []
    wanted = []
    for name in names:
        if name in ("otlp", "console"):
            wanted.append(name)
        elif name != "none":
            log.warning(
                "OTEL_TRACES_EXPORTER=%s is not supported by epp (otlp, console, none): ignored", name
            )
    return wanted


def build_tracer(enabled: bool) -> RequestTracer | None:
    """The request tracer `--tracing` and the OTEL_* environment ask for, or None (trace nothing)."""
    if not enabled:
        return None
    environ = os.environ
    exporters = exporters_from_env(environ)
    if not exporters:
        log.debug("tracing: no OTEL exporter configured (OTEL_EXPORTER_OTLP_ENDPOINT), no spans")
        return None
    span_exporters: list[SpanExporter] = []
    for name in exporters:
        if name == "otlp":
            for var in _PROTOCOL_VARS:
                protocol = environ.get(var, "").strip()
                if protocol and protocol != "grpc":
                    log.warning("%s=%s: epp exports OTLP over gRPC only (as the Go EPP)", var, protocol)
            exporter = _otlp_exporter()
            if exporter is not None:
                span_exporters.append(exporter)
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            span_exporters.append(ConsoleSpanExporter())
    if not span_exporters:
        return None
    tracer = RequestTracer.with_exporters(span_exporters, sampler=_sampler(environ), batch=True)
    log.info("tracing: exporting spans (%s)", ", ".join(exporters))
    return tracer


def _otlp_exporter() -> SpanExporter | None:
    """The OTLP/gRPC span exporter, configured by the OTEL_EXPORTER_OTLP_* environment; None, with
    an error saying how to repair it, when its protobuf modules are unusable: xds-protos (Envoy's
    API) ships an old copy of OpenTelemetry's protos under the same module names, and whichever
    package pip installs last wins (`make install` and the image reinstall opentelemetry-proto)."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        from importlib.metadata import PackageNotFoundError, version

        try:
            wanted = f"opentelemetry-proto=={version('opentelemetry-proto')}"
        except PackageNotFoundError:
            wanted = "opentelemetry-proto"
        log.error(
            "tracing: the OTLP exporter cannot load (%s); another package overwrote OpenTelemetry's "
            "protos: run `pip install --no-deps --force-reinstall %s`. No spans are exported.",
            exc,
            wanted,
        )
        return None
    return OTLPSpanExporter()


def _sampler(environ: Mapping[str, str]) -> Sampler | None:
    """The Go EPP's default sampler when OTEL_TRACES_SAMPLER is unset; None lets the SDK read it."""
    if environ.get("OTEL_TRACES_SAMPLER"):
        return None
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", DEFAULT_SAMPLER_RATIO))
    except ValueError:
        ratio = DEFAULT_SAMPLER_RATIO
    return ParentBased(TraceIdRatioBased(ratio))


class RequestTracer:
    """Starts and fills the spans of a request. Spans are passed explicitly (no ambient context),
    so concurrent streams on one event loop never see each other's. Built only when tracing is
    on, so the OpenTelemetry imports here cost nothing otherwise."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._trace = trace
        self._server = trace.SpanKind.SERVER
        self._error = trace.StatusCode.ERROR
        self._propagator = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
        self._handlers = provider.get_tracer(HANDLERS_SCOPE, __version__)
        self._request_control = provider.get_tracer(REQUEST_CONTROL_SCOPE, __version__)
        self._scheduling = provider.get_tracer(SCHEDULING_SCOPE, __version__)

    @classmethod
    def with_exporters(
        cls, exporters: Sequence[SpanExporter], sampler: Sampler | None = None, batch: bool = True
    ) -> RequestTracer:
        """A tracer exporting to `exporters`: in batches from a background thread (`batch`), or
        each span as it ends (tests)."""
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource({"service.name": SERVICE_NAME, "service.version": __version__}).merge(
            OTELResourceDetector().detect()
        )
        provider = TracerProvider(sampler=sampler, resource=resource, span_limits=_span_limits())
        for exporter in exporters:
            provider.add_span_processor(
                BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
            )
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is pending and stop (also done at interpreter exit)."""
        self.provider.shutdown()

    # --- spans --------------------------------------------------------------------------------------

    def start_request(self, headers: Mapping[str, str], request_id: str) -> Span:
        """`gateway.request`: one ext_proc stream, joined to the caller's trace if its headers
        carry one."""
        parent = self._propagator.extract(carrier=headers)
        span = self._handlers.start_span(REQUEST_SPAN, context=parent, kind=self._server)
        if span.is_recording() and request_id:
            span.set_attribute("gen_ai.request.id", request_id)
        return span

    def start_orchestration(self, parent: Span | None, request: InferenceRequest, priority: int) -> Span:
        """`gateway.request_orchestration`: scheduling one request."""
        context = self._trace.set_span_in_context(parent) if parent is not None else None
        span = self._request_control.start_span(ORCHESTRATION_SPAN, context=context, kind=self._server)
        if span.is_recording():
            span.set_attributes(
                {
                    "target_model": request.target_model,
                    "request_prio": priority,
                    "gen_ai.request.model": request.model,
                    "gen_ai.request.id": request.request_id,
                }
            )
            if parent is not None and parent.is_recording() and request.model:
                parent.set_attribute("gen_ai.request.model", request.model)
        return span

    def record_scheduling(
        self,
        span: Span,
        candidates: int,
        runs: Sequence[ProfileRun] | None,
        result: SchedulingResult | None,
        destination: Sequence[Endpoint] = (),
    ) -> None:
        """The scheduling result on the orchestration span, and a `run_scheduler_profile` child
        per profile that ran (with its real timing)."""
        if not span.is_recording():
            return
        attributes: dict[str, int | str | list[str]] = {
            "llm_d.epp.scheduling.candidate_endpoints": candidates
        }
        if result is not None:
            attributes["llm_d.epp.scheduling.profile.name"] = result.primary_profile
            attributes["llm_d.epp.scheduling.target_endpoints"] = [ep.key for ep in destination]
        if runs:
            attributes["llm_d.epp.profile_handler.executed_profiles"] = len(runs)
        span.set_attributes(attributes)
        if not runs:
            return
        context = self._trace.set_span_in_context(span)
        for name, start, end, run in runs:
            child = self._scheduling.start_span(PROFILE_SPAN, context=context, start_time=start)
            child.set_attributes(_profile_attributes(name, candidates, run))
            child.end(end_time=end)

    def fail(self, span: Span, exc: BaseException, message: str) -> None:
        """The request failed: the span records the exception and ends in error."""
        if span.is_recording():
            from opentelemetry.trace import Status

            span.record_exception(exc)
            span.set_status(Status(self._error, message))


# A span attribute's value is cut at this many characters unless the OTel environment sets a limit:
# a model name is the client's (as long as a body), and up to 2,048 spans wait in the batch queue.
MAX_ATTRIBUTE_CHARS = 1024


def _span_limits() -> SpanLimits:
    from opentelemetry.sdk.trace import SpanLimits

    if os.environ.get("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT") or os.environ.get(
        "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"
    ):
        return SpanLimits()  # reads them
    return SpanLimits(max_span_attribute_length=MAX_ATTRIBUTE_CHARS)


def _profile_attributes(
    name: str, candidates: int, run: ProfileResult | None
) -> dict[str, str | int | list[str] | list[float]]:
    attributes: dict[str, str | int | list[str] | list[float]] = {
        "llm_d.epp.scheduling.profile.name": name,
        "llm_d.epp.filter.candidate_endpoints": candidates,
        "llm_d.epp.filter.filtered_endpoints": len(run.candidates) if run is not None else 0,
    }
    if run is None:
        return attributes
    attributes["llm_d.epp.scorer.count"] = len(run.scorer_scores)
    attributes["llm_d.epp.picker.candidate_endpoints"] = len(run.candidates)
    attributes["llm_d.epp.scheduling.target_endpoints"] = [ep.key for ep in run.endpoints]
    if run.scorer_scores:
        names, maxima, means = [], [], []
        for scorer, scores in run.scorer_scores.items():
            names.append(scorer)
            maxima.append(float(max(scores)) if len(scores) else 0.0)  # a list or a numpy array
            means.append(float(sum(scores)) / len(scores) if len(scores) else 0.0)
        attributes["llm_d.epp.scoring.scorers"] = names
        attributes["llm_d.epp.scoring.score_max"] = maxima
        attributes["llm_d.epp.scoring.score_avg"] = means
    if len(run.totals):
        ranked = sorted(
            zip(run.totals, run.candidates, strict=True), key=lambda pair: (-pair[0], pair[1].namespaced_name)
        )[:TOP_ENDPOINTS]
        attributes["llm_d.epp.picker.top_endpoints"] = [ep.namespaced_name for _, ep in ranked]
        attributes["llm_d.epp.picker.top_scores"] = [float(total) for total, _ in ranked]
    return attributes
