"""Request traces (`--tracing` with the OTEL_* environment): the Go EPP's span names, the
scheduling result on them, errors in their status, the caller's trace joined through
`traceparent`. Requests go through a real gRPC ext_proc stream; spans are read from the SDK's
in-memory exporter, and, for the environment-configured path, from an OTLP/gRPC receiver on
loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from epp.testing import make_request
from epp.tracing import RequestTracer, _sampler, build_tracer, exporters_from_env
from tests.support.epp_app import RunningEpp, running_epp, wait_until
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm

REPO = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"

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
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}, {pluginRef: kv-cache-utilization-scorer}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
"""

_OTEL_VARS = [v for v in os.environ if v.startswith("OTEL_")]


@pytest.fixture(autouse=True)
def no_ambient_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _OTEL_VARS:
        monkeypatch.delenv(var)


@pytest.fixture
async def pods(tmp_path: Path) -> AsyncIterator[tuple[Path, dict[str, FakeVllm]]]:
    servers = {n: await FakeVllm(n, waiting=w).start() for n, w in (("d0", 0), ("d1", 3), ("p0", 0))}
    entries = [
        {
            "address": "127.0.0.1",
            "port": s.port,
            "name": n,
            "labels": {"llm-d.ai/role": "prefill" if n.startswith("p") else "decode"},
        }
        for n, s in servers.items()
    ]
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump(entries))
    yield path, servers
    for s in servers.values():
        await s.stop()


@pytest.fixture
async def traced(
    pods: tuple[Path, dict[str, FakeVllm]],
) -> AsyncIterator[tuple[RunningEpp, InMemorySpanExporter]]:
    path, _ = pods
    exporter = InMemorySpanExporter()
    async with running_epp("--endpoints-file", str(path), "--config-text", PD_CONFIG) as epp:
        await wait_until(lambda: len(epp.app.datastore) == 3, what="endpoints")
        # Scraped once each: the test reads the queue scorer's preference for d0 (d1 has 3 waiting).
        await wait_until(
            lambda: all(ep.metrics.updated_at > 0 for ep in epp.app.datastore.endpoints()), what="scrapes"
        )
        epp.app.director.tracer = RequestTracer.with_exporters([exporter], sampler=ALWAYS_ON, batch=False)
        yield epp, exporter


def completion(model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "prompt": "tell me about tracing " * 8})


async def finished_spans(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The spans of the last request, once its stream span (the last to end) has ended."""
    await wait_until(lambda: len(exporter.get_finished_spans()) >= count, what=f"{count} spans")
    return list(exporter.get_finished_spans())


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


async def test_a_request_is_traced_with_its_scheduling_result(
    traced: tuple[RunningEpp, InMemorySpanExporter], pods: tuple[Path, dict[str, FakeVllm]]
) -> None:
    epp, exporter = traced
    _, servers = pods
    headers = request_headers(**{"traceparent": TRACEPARENT, "x-request-id": "req-42"})
    await one_request(epp.stub, headers, completion())
    spans = await finished_spans(exporter, 4)  # the stream, scheduling, and the two profiles
    request = one(spans, "gateway.request")
    orchestration = one(spans, "gateway.request_orchestration")
    profiles = {
        s.attributes["llm_d.epp.scheduling.profile.name"]: s
        for s in spans
        if s.name == "run_scheduler_profile"
    }  # type: ignore[index]

    # The stream's span joins the caller's trace (traceparent), the others nest under it.
    assert request.kind is SpanKind.SERVER and orchestration.kind is SpanKind.SERVER
    assert request.context is not None and format(request.context.trace_id, "032x") == TRACE_ID
    assert request.parent is not None and format(request.parent.span_id, "016x") == PARENT_SPAN_ID
    assert orchestration.parent is not None and orchestration.parent.span_id == request.context.span_id
    assert orchestration.context is not None
    for span in profiles.values():
        assert span.parent is not None and span.parent.span_id == orchestration.context.span_id
    assert request.instrumentation_scope is not None
    assert request.instrumentation_scope.name == "llm-d-router/pkg/epp/handlers"
    assert request.resource.attributes["service.name"] == "llm-d-epp"
    assert request.attributes is not None
    assert request.attributes["gen_ai.request.id"] == "req-42"
    assert request.attributes["gen_ai.request.model"] == "m"
    assert request.status.status_code is StatusCode.UNSET

    # The scheduling result: model, profile, where the request goes, out of how many.
    d0 = f"127.0.0.1:{servers['d0'].port}"  # the decode pod with the shorter queue
    p0 = f"127.0.0.1:{servers['p0'].port}"
    attributes = dict(orchestration.attributes or {})
    assert attributes["target_model"] == "m" and attributes["request_prio"] == 0
    assert attributes["gen_ai.request.id"] == "req-42"
    assert attributes["llm_d.epp.scheduling.profile.name"] == "decode"
    assert attributes["llm_d.epp.scheduling.target_endpoints"][0] == d0  # type: ignore[index]
    assert attributes["llm_d.epp.scheduling.candidate_endpoints"] == 3
    assert attributes["llm_d.epp.profile_handler.executed_profiles"] == 2

    # One span per profile, timed within the scheduling span, with its candidates and scores.
    assert set(profiles) == {"decode", "prefill"}
    decode = dict(profiles["decode"].attributes or {})
    assert decode["llm_d.epp.filter.candidate_endpoints"] == 3
    assert decode["llm_d.epp.filter.filtered_endpoints"] == 2
    assert decode["llm_d.epp.scorer.count"] == 2
    assert list(decode["llm_d.epp.scoring.scorers"]) == ["queue-scorer", "kv-cache-utilization-scorer"]  # type: ignore[arg-type]
    assert list(decode["llm_d.epp.picker.top_endpoints"]) == ["d0", "d1"]  # type: ignore[arg-type]
    top_scores = list(decode["llm_d.epp.picker.top_scores"])  # type: ignore[arg-type]
    assert top_scores[0] > top_scores[1]
    assert tuple(decode["llm_d.epp.scheduling.target_endpoints"]) == (d0,)  # type: ignore[arg-type]
    assert list(dict(profiles["prefill"].attributes or {})["llm_d.epp.scheduling.target_endpoints"]) == [p0]  # type: ignore[arg-type]
    for span in profiles.values():
        assert span.start_time is not None and span.end_time is not None
        assert orchestration.start_time is not None and orchestration.end_time is not None
        assert orchestration.start_time <= span.start_time <= span.end_time <= orchestration.end_time


@pytest.mark.parametrize(
    ("body", "subset", "code", "scheduled"),
    [
        (b"{not json", None, 400, False),  # fails before scheduling
        (None, [], 503, True),  # the subset hint leaves no endpoint
    ],
)
async def test_errors_set_the_span_status(
    traced: tuple[RunningEpp, InMemorySpanExporter],
    body: bytes | None,
    subset: list[str] | None,
    code: int,
    scheduled: bool,
) -> None:
    epp, exporter = traced
    replies = await one_request(epp.stub, request_headers(), body or completion(), subset=subset)
    assert replies[0].immediate_response.status.code == code
    spans = await finished_spans(exporter, 2 if scheduled else 1)
    request = one(spans, "gateway.request")
    assert request.status.status_code is StatusCode.ERROR and request.status.description
    assert [e.name for e in request.events] == ["exception"]
    if scheduled:
        orchestration = one(spans, "gateway.request_orchestration")
        assert orchestration.status.status_code is StatusCode.ERROR
        assert "no ready endpoint" in (orchestration.status.description or "")
    else:
        assert not [s for s in spans if s.name == "gateway.request_orchestration"]


async def test_filters_leaving_nothing_show_in_the_profile_span(tmp_path: Path) -> None:
    server = await FakeVllm("p0").start()
    try:
        path = tmp_path / "endpoints.yaml"
        entry = {
            "address": "127.0.0.1",
            "port": server.port,
            "name": "p0",
            "labels": {"llm-d.ai/role": "prefill"},
        }
        path.write_text(yaml.safe_dump([entry]))
        exporter = InMemorySpanExporter()
        async with running_epp("--endpoints-file", str(path), "--config-text", PD_CONFIG) as epp:
            await wait_until(lambda: len(epp.app.datastore) == 1, what="endpoints")
            epp.app.director.tracer = RequestTracer.with_exporters([exporter], sampler=ALWAYS_ON, batch=False)
            replies = await one_request(epp.stub, request_headers(), completion())
            assert replies[0].immediate_response.status.code == 429
            spans = await finished_spans(exporter, 3)
    finally:
        await server.stop()
    decode = one(spans, "run_scheduler_profile")
    assert dict(decode.attributes or {})["llm_d.epp.filter.filtered_endpoints"] == 0
    assert one(spans, "gateway.request_orchestration").status.status_code is StatusCode.ERROR


@pytest.mark.parametrize("limit", ["", "50"])
def test_a_clients_huge_model_name_is_cut_in_the_span(limit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans wait in the batch queue after their request is gone: the client's model name (as long
    as its body) is cut at 1,024 characters, or at the OTel environment's own limit when set."""
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", limit)
    exporter = InMemorySpanExporter()
    tracer = RequestTracer.with_exporters([exporter], sampler=ALWAYS_ON, batch=False)
    span = tracer.start_orchestration(None, make_request("hi", model="m" * 100_000), 0)
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert len(str(dict(finished.attributes or {})["gen_ai.request.model"])) == int(limit or 1024)


# --- configured by the environment, exported over OTLP/gRPC ------------------------------------------


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP trace receiver: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def span_names(self) -> list[str]:
        return [
            span.name
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def service_names(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for resource_spans in request.resource_spans
            for attribute in resource_spans.resource.attributes
            if attribute.key == "service.name"
        }


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield receiver, port
    await server.stop(0)


async def test_the_otel_environment_sends_spans_to_an_otlp_collector(
    collector: tuple[Collector, int], pods: tuple[Path, dict[str, FakeVllm]], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, port = collector
    path, _ = pods
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "epp-under-test")
    async with running_epp("--endpoints-file", str(path), "--config-text", PD_CONFIG) as epp:
        tracer = epp.app.director.tracer
        assert tracer is not None
        try:
            await wait_until(lambda: len(epp.app.datastore) == 3, what="endpoints")
            await wait_until(
                lambda: all(ep.metrics.updated_at > 0 for ep in epp.app.datastore.endpoints()), what="scrapes"
            )
            await one_request(epp.stub, request_headers(), completion())
            await wait_until(lambda: "gateway.request" in receiver.span_names(), timeout=10, what="export")
        finally:
            await asyncio.get_running_loop().run_in_executor(None, tracer.shutdown)
    names = receiver.span_names()
    assert names.count("run_scheduler_profile") == 2
    assert {"gateway.request", "gateway.request_orchestration"} <= set(names)
    assert receiver.service_names() == {"epp-under-test"}


async def test_tracing_false_or_no_exporter_means_no_tracer(
    pods: tuple[Path, dict[str, FakeVllm]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = pods
    async with running_epp("--endpoints-file", str(path)) as epp:
        assert epp.app.director.tracer is None  # no exporter configured
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    async with running_epp("--endpoints-file", str(path), "--tracing=false") as epp:
        assert epp.app.director.tracer is None
    assert build_tracer(False) is None


def test_an_unloadable_otlp_exporter_is_an_error_with_the_repair_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As when xds-protos' old copy of OpenTelemetry's protos was installed over opentelemetry-proto's.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert build_tracer(True) is None
    assert "pip install --no-deps --force-reinstall opentelemetry-proto==" in caplog.text


def test_without_an_exporter_the_sdk_is_not_imported() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = (
        "import sys\n"
        "import epp.app\n"
        "from epp.tracing import build_tracer\n"
        "assert build_tracer(True) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize(
    ("variables", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),  # the SDK's default endpoint, localhost:4317
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_exporters_from_the_environment(variables: dict[str, str], exporters: list[str]) -> None:
    assert exporters_from_env(variables) == exporters


def test_the_default_sampler_is_the_go_epps() -> None:
    sampler = _sampler({})
    assert isinstance(sampler, ParentBased)
    assert "TraceIdRatioBased{0.1}" in sampler.get_description()
    assert (
        "TraceIdRatioBased{0.5}"
        in (_sampler({"OTEL_TRACES_SAMPLER_ARG": "0.5"}) or ALWAYS_ON).get_description()
    )
    assert _sampler({"OTEL_TRACES_SAMPLER": "always_on"}) is None  # the SDK reads it
