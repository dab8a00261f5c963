"""epp's Prometheus metrics as a scraper sees them: the canonical `llm_d_epp_*` names with
llm-d-router's types, labels and buckets, the deprecated names kept as aliases, the caps on
request-derived labels, and the opt-in ext_proc stream metrics. Requests go through a real
gRPC ext_proc stream; metrics are read from epp's /metrics over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from epp.framework.registry import installed_registry
from epp.observability import (
    MAX_LABEL_VALUE_CHARS,
    MAX_MODEL_LABEL_VALUES,
    MAX_REQUEST_LABEL_SETS,
    EppMetrics,
)
from epp.scheduling.loader import load_config
from epp.testing import make_endpoint, make_request, route
from epp_scorers.profile_handlers.disagg import MAX_MODEL_LABELS
from tests.support.epp_app import RunningEpp, running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, one_request, request_headers
from tests.support.fake_vllm import FakeVllm

DEST = "x-gateway-destination-endpoint"
FAIRNESS = "x-llm-d-inference-fairness-id"


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeVllm]]:
    servers = [await FakeVllm(f"s{i}", waiting=2 * i, running=i, kv_usage=0.25 * i).start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


@pytest.fixture
async def epp(fakes: list[FakeVllm]) -> AsyncIterator[RunningEpp]:
    async with running_epp("--endpoints", ",".join(f.address for f in fakes)) as running:
        yield running


class Scrape:
    """One GET /metrics, parsed: HELP and TYPE per family, and the samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def value(self, metric: str, /, **labels: str) -> float | None:
        """The sample's value, summed over the labels not given; None when there is none."""
        found = [s.value for s in self.samples if s.name == metric and labels.items() <= s.labels.items()]
        return sum(found) if found else None

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}

    def buckets(self, name: str) -> list[float]:
        les = {s.labels["le"] for s in self.samples if s.name == f"{name}_bucket"}
        return sorted(float(le) for le in les if le != "+Inf")


async def scrape(epp: RunningEpp) -> Scrape:
    assert epp.app.ports is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{epp.app.ports.metrics}/metrics") as resp,
    ):
        assert resp.status == 200
        return Scrape(await resp.text())


def completion(prompt: str = "hello world", model: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt, **extra})


async def streamed_request(epp: RunningEpp, headers: dict[str, str], sse_chunks: list[bytes]) -> str:
    """One request through ext_proc, answered with a streamed (SSE) response in `sse_chunks`, a
    little apart; returns the endpoint epp picked."""
    client = ExtProcClient(epp.stub)
    body = completion("tell me a story " * 20, stream=True)
    client.send([headers_msg(headers), *body_msgs(body, 1000)])
    first = await client.read(2)
    mutation = first[0].request_headers.response.header_mutation
    destination = next(h.header.raw_value.decode() for h in mutation.set_headers if h.header.key == DEST)
    client.send([headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True)])
    await client.read(1)
    for chunk in sse_chunks:
        await asyncio.sleep(0.01)
        client.send([pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False))])
        await client.read(1)
    client.send([pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True))])
    await client.read(1)
    await client.close()
    return destination


SSE = [
    b'data: {"choices":[{"text":"a"}]}\n\n',
    b'data: {"choices":[{"text":"b"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":5,'
    b'"prompt_tokens_details":{"cached_tokens":4}}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_a_streamed_request_is_measured_under_the_canonical_names_and_the_old_ones(
    epp: RunningEpp,
) -> None:
    headers = request_headers(**{FAIRNESS: "tenant-a"})
    destination = await streamed_request(epp, headers, SSE)
    registry = epp.app.metrics.registry
    # The response-processing time is observed when Envoy (here: the test) closes the stream.
    await wait_until(
        lambda: registry.get_sample_value("llm_d_epp_response_processing_duration_seconds_count") == 1,
        what="the stream closed",
    )
    m = await scrape(epp)
    labels = {"model_name": "m", "target_model_name": "m", "fairness_id": "tenant-a", "priority": "0"}
    assert m.value("llm_d_epp_request_total", **labels) == 1
    assert m.value("llm_d_epp_request_running", **labels) == 0
    body_size = len(completion("tell me a story " * 20, stream=True))
    assert m.value("llm_d_epp_request_size_bytes_sum", **labels) == body_size
    assert m.value("llm_d_epp_response_size_bytes_sum", **labels) == sum(len(c) for c in SSE)
    assert m.value("llm_d_epp_request_input_tokens_sum", **labels) == 11
    assert m.value("llm_d_epp_request_output_tokens_sum", **labels) == 5
    assert m.value("llm_d_epp_request_cached_tokens_sum", **labels) == 4
    assert m.value("llm_d_epp_request_duration_seconds_count", **labels) == 1
    duration = m.value("llm_d_epp_request_duration_seconds_sum", **labels)
    assert duration is not None and duration >= 0.04  # four chunks 10 ms apart
    ntpot = m.value("llm_d_epp_request_ntpot_seconds_sum", **labels)
    assert ntpot == pytest.approx(duration / 5)
    # Time to first token: the first chunk, 10 ms or more after the request; then one
    # inter-token gap per further chunk, and one time-per-output-token.
    ttft = m.value("llm_d_epp_request_ttft_seconds_sum", **labels, streaming="true")
    assert ttft is not None and 0.01 <= ttft < duration
    assert m.value("llm_d_epp_request_streaming_itl_seconds_count", **labels) == len(SSE) - 1
    tpot = m.value("llm_d_epp_request_streaming_tpot_seconds_sum", **labels)
    assert tpot == pytest.approx((duration - ttft) / 4)
    assert m.value("llm_d_epp_request_processing_duration_seconds_count") == 1
    assert m.value("llm_d_epp_response_processing_duration_seconds_count") == 1
    endpoint = epp.app.datastore.get(destination)
    assert endpoint is not None
    assert (
        m.value(
            "llm_d_epp_scheduler_attempts_total",
            status="success",
            target_model_name="m",
            endpoint_name=endpoint.name,
            port=str(endpoint.port),
        )
        == 1
    )
    assert m.value("llm_d_epp_scheduler_e2e_duration_seconds_count") == 1
    assert m.value("llm_d_epp_plugin_duration_seconds_count", extension_point="ProcessProfilesResults")

    # The deprecated names agree, with their own (fewer) labels and HELP saying what replaces them.
    old = {"model_name": "m", "target_model_name": "m"}
    assert m.value("inference_objective_request_total", **old, priority="0") == 1
    assert m.value("inference_objective_running_requests", model_name="m") == 0
    assert m.value("inference_objective_output_tokens_sum", **old) == 5
    assert m.value("inference_objective_prompt_cached_tokens_sum", **old) == 4
    assert m.value("inference_objective_request_duration_seconds_sum", **old) == duration
    assert m.value("inference_objective_request_sizes_sum", **old) == body_size
    assert m.value("inference_objective_response_sizes_sum", **old) == sum(len(c) for c in SSE)
    assert m.value("inference_objective_normalized_time_per_output_token_seconds_sum", **old) == ntpot
    assert m.value("inference_extension_scheduler_e2e_duration_seconds_count") == 1
    assert m.value("inference_extension_scheduler_attempts_total", pod_name=endpoint.name) == 1
    assert (
        "fairness_id"
        not in next(s for s in m.samples if s.name == "inference_objective_request_total").labels
    )
    for old_name, new_name in [
        ("inference_objective_request", "llm_d_epp_request_total"),
        ("inference_objective_request_duration_seconds", "llm_d_epp_request_duration_seconds"),
        ("inference_pool_ready_pods", "llm_d_epp_ready_endpoints"),
        ("inference_extension_plugin_duration_seconds", "llm_d_epp_plugin_duration_seconds"),
    ]:
        assert f"[Deprecated: Use {new_name}]" in m.families[old_name].documentation


async def test_types_labels_and_buckets_are_llm_d_routers(epp: RunningEpp) -> None:
    await one_request(epp.stub, request_headers(), completion())
    m = await scrape(epp)
    types = {name: family.type for name, family in m.families.items()}
    request_labels = ["model_name", "target_model_name", "fairness_id", "priority"]
    for name, kind in [
        ("llm_d_epp_request", "counter"),
        ("llm_d_epp_request_error", "counter"),
        ("llm_d_epp_request_duration_seconds", "histogram"),
        ("llm_d_epp_request_size_bytes", "histogram"),
        ("llm_d_epp_request_running", "gauge"),
        ("llm_d_epp_ready_endpoints", "gauge"),
        ("llm_d_epp_per_endpoint_queue_size", "gauge"),
        ("llm_d_epp_scheduler_e2e_duration_seconds", "histogram"),
        ("llm_d_epp_scheduler_attempts", "counter"),
        ("llm_d_epp_plugin_duration_seconds", "histogram"),
        ("llm_d_epp_datalayer_poll_errors", "counter"),
        ("llm_d_epp_info", "gauge"),
        ("llm_d_epp_prefix_indexer_size", "gauge"),
        ("llm_d_epp_prefix_indexer_hit_ratio", "histogram"),
        ("llm_d_epp_prefix_indexer_hit_bytes", "histogram"),
    ]:
        assert types.get(name) == kind, name
    sample = next(s for s in m.samples if s.name == "llm_d_epp_request_total")
    assert sorted(sample.labels) == sorted(request_labels)
    assert m.buckets("llm_d_epp_request_duration_seconds")[-1] == 3600
    assert m.buckets("llm_d_epp_request_size_bytes")[0] == 64
    assert m.buckets("llm_d_epp_request_size_bytes")[-1] == 1073741824
    assert m.buckets("llm_d_epp_scheduler_e2e_duration_seconds") == [
        0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1
    ]  # fmt: skip
    assert m.buckets("llm_d_epp_plugin_duration_seconds") == m.buckets(
        "llm_d_epp_scheduler_e2e_duration_seconds"
    )
    assert m.buckets("llm_d_epp_prefix_indexer_hit_bytes")[-1] == 65536
    info = next(s for s in m.samples if s.name == "llm_d_epp_info")
    assert set(info.labels) == {"commit", "build_ref"} and info.value == 1
    assert not [s for s in m.samples if s.name.endswith("_created")]  # the Go EPP exposes none
    # The stream metrics are opt-in.
    assert "llm_d_epp_extproc_streams_inflight" not in m.families


async def test_errors_are_counted_by_code_and_not_as_processed_requests(epp: RunningEpp) -> None:
    await one_request(epp.stub, request_headers(), b"{not json")
    await one_request(epp.stub, request_headers(**{FAIRNESS: "t"}), completion(), subset=[])
    m = await scrape(epp)
    assert m.value("llm_d_epp_request_error_total", error_code="BadRequest", model_name="") == 1
    assert m.value("llm_d_epp_request_error_total", error_code="ServiceUnavailable", fairness_id="t") == 1
    assert m.value("inference_objective_request_error_total", error_code="ServiceUnavailable") == 1
    assert m.value("llm_d_epp_request_total") is None  # as in the Go EPP: scheduled requests only
    assert m.value("llm_d_epp_request_processing_duration_seconds_count") == 2


async def test_pool_gauges_cover_the_endpoints_with_fresh_metrics(
    epp: RunningEpp, fakes: list[FakeVllm]
) -> None:
    await wait_until(
        lambda: all(ep.metrics.updated_at for ep in epp.app.datastore.endpoints()), what="scrapes"
    )
    epp.app.director.refresh_pool_metrics()
    m = await scrape(epp)
    pool = {"name": "standalone"}
    assert m.value("llm_d_epp_ready_endpoints", **pool) == 3
    assert m.value("inference_pool_ready_pods", **pool) == 3
    # waiting 0, 2, 4; running 0, 1, 2; KV usage 0, 0.25, 0.5 (sample standard deviation, as Go).
    assert m.value("llm_d_epp_average_queue_size", **pool) == 2
    assert m.value("llm_d_epp_std_dev_queue_size", **pool) == 2
    assert m.value("llm_d_epp_average_running_requests", **pool) == 1
    assert m.value("llm_d_epp_std_dev_running_requests", **pool) == 1
    assert m.value("llm_d_epp_average_kv_cache_utilization", **pool) == 0.25
    assert m.value("inference_pool_average_kv_cache_utilization", **pool) == 0.25
    queues = {
        s.labels["model_server_endpoint"]: s.value
        for s in m.samples
        if s.name == "llm_d_epp_per_endpoint_queue_size"
    }
    names = {f.address: ep.go_id for f in fakes if (ep := epp.app.datastore.get(f.address)) is not None}
    assert queues == {names[f.address]: f.waiting for f in fakes}
    assert m.label_values("inference_pool_per_pod_queue_size", "model_server_pod") == set(queues)


async def test_failed_polls_are_datalayer_poll_errors(epp: RunningEpp, fakes: list[FakeVllm]) -> None:
    fakes[0].metrics_status = 500
    endpoint = epp.app.datastore.get(fakes[0].address)
    assert endpoint is not None
    await wait_until(lambda: endpoint.scrape_errors >= 2, what="failed polls")
    m = await scrape(epp)
    errors = m.value("llm_d_epp_datalayer_poll_errors_total", source_type="metrics-data-source")
    assert errors is not None and errors >= 2
    old = m.value("llm_d_inference_scheduler_datalayer_poll_errors_total", source_type="metrics-data-source")
    assert old is not None and old >= 2
    assert m.value("epp_endpoint_scrape_errors_total", endpoint=fakes[0].address)


async def test_request_labels_are_capped_at_1000_values(epp: RunningEpp) -> None:
    metrics = epp.app.metrics
    # 999 model names seen before (as label values of earlier requests), then "m": the cap is full.
    for i in range(MAX_MODEL_LABEL_VALUES - 1):
        metrics.models.bound(f"model-{i}")
    await one_request(epp.stub, request_headers(), completion(model="m"))
    await one_request(epp.stub, request_headers(), completion(model="one-too-many"))
    await one_request(epp.stub, request_headers(), completion(model="yet-another"))
    for i in range(1000):  # fairness ids have a cap of their own
        metrics.fairness.bound(f"tenant-{i}")
    await one_request(epp.stub, request_headers(**{FAIRNESS: "late-tenant"}), completion(model="m"))
    m = await scrape(epp)
    assert m.value("llm_d_epp_request_total", model_name="m", fairness_id="default-flow") == 1
    assert m.value("llm_d_epp_request_total", model_name="other", target_model_name="other") == 2
    assert m.value("inference_objective_request_total", model_name="other") == 2
    assert m.value("llm_d_epp_request_total", model_name="m", fairness_id="other") == 1
    models = m.label_values("llm_d_epp_request_total", "model_name") | m.label_values(
        "llm_d_epp_request_duration_seconds_count", "model_name"
    )
    assert len(models) <= MAX_MODEL_LABEL_VALUES + 1 and "one-too-many" not in models


def test_a_pod_replaced_at_the_same_address_gets_its_own_attempts_and_both_go_with_it() -> None:
    """The datastore renames an endpoint in place when a new pod takes its address and port:
    attempts after that count under the new pod's name, and the endpoint leaving drops both."""
    metrics = EppMetrics()
    ep = make_endpoint("10.0.0.7")
    ep.pod_name = "pod-a"
    metrics.count_schedule_attempt("m", ep)
    ep.name = ep.pod_name = "pod-b"  # what Datastore.replace_all does
    metrics.count_schedule_attempt("m", ep)
    metrics.count_schedule_attempt("m", ep)

    def attempts(pod: str) -> float | None:
        labels = {"status": "success", "target_model_name": "m", "endpoint_name": pod}
        return metrics.registry.get_sample_value(
            "llm_d_epp_scheduler_attempts_total", {**labels, "namespace": "", "port": "8000"}
        )

    assert (attempts("pod-a"), attempts("pod-b")) == (1, 2)
    metrics.forget_endpoint(ep)
    assert (attempts("pod-a"), attempts("pod-b")) == (None, None)


def test_the_cap_keeps_running_gauges_balanced() -> None:
    metrics = EppMetrics()
    metrics.for_request("early", "early")
    for i in range(MAX_MODEL_LABEL_VALUES - 1):
        metrics.models.bound(f"m{i}")
    assert metrics.for_request("early", "early").requests is metrics.for_request("early", "early").requests
    late = metrics.for_request("late", "late")
    assert late is metrics.for_request("late", "late")  # the same "other" children every time
    assert late.running is not None
    late.running.inc()
    metrics.for_request("late", "late").running.dec()  # type: ignore[union-attr]
    assert (
        metrics.registry.get_sample_value("inference_objective_running_requests", {"model_name": "other"})
        == 0
    )


async def test_a_very_long_model_name_is_served_and_reported_as_other(epp: RunningEpp) -> None:
    """A model name is the client's to choose: one of a megabyte routes as any other, but its
    series would carry it twice on every /metrics page for the life of the process."""
    huge = "m" * (MAX_LABEL_VALUE_CHARS + 1)
    replies = await one_request(epp.stub, request_headers(), completion(model="x" * 1_000_000))
    assert replies[0].HasField("request_headers")  # routed, not refused
    await one_request(epp.stub, request_headers(), completion(model=huge))
    await one_request(epp.stub, request_headers(), completion(model="m" * MAX_LABEL_VALUE_CHARS))
    m = await scrape(epp)
    assert m.value("llm_d_epp_request_total", model_name="other", target_model_name="other") == 2
    assert m.value("llm_d_epp_request_total", model_name="m" * MAX_LABEL_VALUE_CHARS) == 1
    longest = max(len(v) for v in m.label_values("llm_d_epp_request_total", "model_name"))
    assert longest == MAX_LABEL_VALUE_CHARS


def test_label_sets_past_the_cap_share_one_set_of_other_series() -> None:
    """Each label is capped alone (1000 values), but the model, the rewrite target and the
    fairness id combine: past MAX_REQUEST_LABEL_SETS sets, new ones report as other, and the
    sets admitted before keep their own series (and their gauges stay balanced)."""
    metrics = EppMetrics()
    first = metrics.for_request("m0", "t0", "tenant-0")
    for i in range(1, MAX_REQUEST_LABEL_SETS):  # i = 0 would be the first set again
        metrics.for_request(f"m{i % 40}", f"t{i // 40}", f"tenant-{i % 7}")
    late = metrics.for_request("m1", "t1", "tenant-3")  # each value admitted before, the set is new
    assert late is metrics.for_request("m9", "t9", "tenant-9")
    assert late.requests is metrics.for_request("other", "other", "other").requests
    assert metrics.for_request("m0", "t0", "tenant-0") is first
    late.running.inc()  # type: ignore[union-attr]
    metrics.for_request("m1", "t1", "tenant-3").running.dec()  # type: ignore[union-attr]
    running = metrics.registry.get_sample_value(
        "llm_d_epp_request_running", {"model_name": "other", "target_model_name": "other",
                                      "fairness_id": "other", "priority": "0"}
    )  # fmt: skip
    assert running == 0
    for i in range(MAX_REQUEST_LABEL_SETS + 10):
        metrics.count_error(f"m{i % 40}", f"t{i // 40}", "BadRequest", f"tenant-{i % 7}")
    errors = {
        tuple(s.labels.values())
        for family in metrics.registry.collect()
        if family.name == "llm_d_epp_request_error"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert len(errors) == MAX_REQUEST_LABEL_SETS + 1  # the sets admitted, then one of "other"


async def test_grpc_stream_metrics_count_streams_by_code() -> None:
    fake = await FakeVllm("s").start()
    try:
        async with running_epp("--endpoints", fake.address, "--enable-grpc-stream-metrics") as epp:
            whole = ExtProcClient(epp.stub)  # request, then a response without a body
            whole.send([headers_msg(request_headers()), *body_msgs(completion(), 1000)])
            await whole.read(2)
            whole.send([headers_msg({":status": "200"}, end_of_stream=True, response=True)])
            await whole.read(1)
            await whole.close()
            streams = epp.app.metrics.streams
            assert streams is not None
            await wait_until(lambda: streams.inflight._value.get() == 0, what="the whole stream ended")
            cancelled = ExtProcClient(epp.stub)
            cancelled.send([headers_msg(request_headers()), *body_msgs(completion(), 1000)])
            await cancelled.read(2)
            m = await scrape(epp)
            assert m.value("llm_d_epp_extproc_streams_inflight") == 1
            cancelled.cancel()
            await wait_until(lambda: streams.inflight._value.get() == 0, what="the cancelled stream closed")
            m = await scrape(epp)
            assert m.value("llm_d_epp_extproc_streams_total", code="OK") == 1
            assert m.value("llm_d_epp_extproc_streams_total", code="Canceled") == 1
            assert m.value("llm_d_epp_extproc_stream_duration_seconds_count") == 2
            assert m.buckets("llm_d_epp_extproc_stream_duration_seconds")[-1] == 600
    finally:
        await fake.stop()


# --- plugins' metrics -------------------------------------------------------------------------------

PREFIX_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {autoTune: false, blockSizeTokens: 64}
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}, {pluginRef: max-score-picker}]
"""


def test_prefix_indexer_metrics_by_plugin_and_deprecated() -> None:
    metrics = EppMetrics()
    from epp.framework import PluginHandle

    scheduler = load_config(
        PREFIX_CONFIG, installed_registry(), handle=PluginHandle(metrics.registry)
    ).scheduler
    endpoints = [make_endpoint("a"), make_endpoint("b")]
    prompt = "x" * 2048  # 8 blocks of 64 tokens (4 characters each)
    route(scheduler, endpoints, make_request(prompt))
    route(scheduler, endpoints, make_request(prompt + "y" * 1024))  # 8 of 12 blocks cached
    registry = metrics.registry
    plugin = {"plugin_name": "approx-prefix-cache-producer", "plugin_type": "approx-prefix-cache-producer"}
    assert registry.get_sample_value("llm_d_epp_prefix_indexer_size", plugin) == 8 + 12 - 8
    assert registry.get_sample_value("inference_extension_prefix_indexer_size") == 12
    assert registry.get_sample_value("llm_d_epp_prefix_indexer_hit_ratio_sum", plugin) == pytest.approx(
        8 / 12
    )
    assert registry.get_sample_value("inference_extension_prefix_indexer_hit_ratio_sum") == pytest.approx(
        8 / 12
    )
    assert registry.get_sample_value("llm_d_epp_prefix_indexer_hit_bytes_sum", plugin) == 8 * 64 * 4
    assert registry.get_sample_value("inference_extension_prefix_indexer_hit_bytes_count") == 2


PD_HANDLER_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: always-disagg-pd-decider
- type: {handler}
  parameters: {parameters}
- type: queue-scorer
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: queue-scorer}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: queue-scorer}}]
"""


@pytest.mark.parametrize(
    ("handler", "parameters", "canonical", "deprecated"),
    [
        (
            "disagg-profile-handler",
            "{deciders: {prefill: always-disagg-pd-decider}}",
            "llm_d_epp_disagg_decision_total",
            "llm_d_inference_scheduler_disagg_decision_total",
        ),
        (
            "pd-profile-handler",
            "{deciderPluginName: always-disagg-pd-decider}",
            "llm_d_epp_pd_decision_total",
            "llm_d_inference_scheduler_pd_decision_total",
        ),
    ],
)
def test_pd_decisions_under_llm_d_routers_names_with_capped_models(
    handler: str, parameters: str, canonical: str, deprecated: str
) -> None:
    config = PD_HANDLER_CONFIG.format(handler=handler, parameters=parameters)
    scheduler = load_config(config, installed_registry()).scheduler
    endpoints = [make_endpoint("p", role="prefill"), make_endpoint("d", role="decode")]
    for i in range(MAX_MODEL_LABELS + 2):
        route(scheduler, endpoints, make_request("hello", model=f"model-{i}"))
    registry = scheduler.handle.registry
    labels = {"plugin_name": handler, "plugin_type": handler, "decision_type": "prefill-decode"}
    assert registry.get_sample_value(canonical, {**labels, "model_name": "model-0"}) == 1
    assert registry.get_sample_value(canonical, {**labels, "model_name": "other"}) == 2
    old = {"model_name": "other", "decision_type": "prefill-decode"}
    assert registry.get_sample_value(deprecated, old) == 2
    documentation = next(
        f.documentation for f in registry.collect() if f.name == deprecated[: -len("_total")]
    )
    assert f"Deprecated: Use {canonical}" in documentation
