"""InferenceModelRewrite on the request path, through epp's ext_proc server (real gRPC on
loopback) with `--inference-model-rewrites-file`: the body forwarded to the model server names
the target model (content-length to match), the response names the model the client asked
for, scheduling and the metrics see the target, and a weighted rule splits requests by weight."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.framework import EndpointMetrics
from tests.support.epp_app import RunningEpp, running_epp
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, request_headers

REWRITES = """
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: alias, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {type: Exact, value: food-review}}]
    targets: [{modelRewrite: food-review-v1}]
  - matches: [{model: {value: canary}}]
    targets: [{modelRewrite: canary-v1, weight: 3}, {modelRewrite: canary-v2, weight: 1}]
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: fallback, creationTimestamp: "2025-02-01T00:00:00Z"}
spec:
  poolRef: {name: pool}
  rules:
  - targets: [{modelRewrite: base-model}]
"""


@pytest.fixture
async def epp(tmp_path: Path) -> AsyncIterator[RunningEpp]:
    path = tmp_path / "rewrites.yaml"
    path.write_text(REWRITES)
    async with running_epp("--endpoints", "127.0.0.1:9", "--inference-model-rewrites-file", str(path)) as epp:
        yield epp


def _set_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def route(epp: RunningEpp, model: str, **headers: str) -> tuple[ExtProcClient, dict[str, str], bytes]:
    """Send one request naming `model`: (its open stream, the headers epp sets, the body it forwards)."""
    client = ExtProcClient(epp.stub)
    body = orjson.dumps({"model": model, "prompt": "hello", "max_tokens": 4})
    client.send([headers_msg(request_headers(**headers)), *body_msgs(body, 16)])
    routed, forwarded = await client.read(2)
    return client, _set_headers(routed), forwarded.request_body.response.body_mutation.streamed_response.body


async def respond(client: ExtProcClient, body: bytes) -> bytes:
    """The model server's answer goes back through epp: the body the client gets."""
    client.send([headers_msg({":status": "200", "content-type": "application/json"}, response=True)])
    await client.read(1)
    client.send(body_msgs(body, 1000, response=True))
    (reply,) = await client.read(1)
    await client.close()
    return bytes(reply.response_body.response.body_mutation.streamed_response.body)


async def test_exact_match_rewrites_the_forwarded_body_and_the_response(epp: RunningEpp) -> None:
    client, headers, forwarded = await route(epp, "food-review")
    assert orjson.loads(forwarded) == {"model": "food-review-v1", "prompt": "hello", "max_tokens": 4}
    assert headers["content-length"] == str(len(forwarded))
    # The model server names the model it ran; the client sees the one it asked for (as upstream).
    answer = await respond(client, b'{"id":"x","model":"food-review-v1","choices":[]}')
    assert orjson.loads(answer) == {"id": "x", "model": "food-review", "choices": []}
    sample = epp.app.metrics.registry.get_sample_value
    labels = {"model_name": "food-review", "target_model_name": "food-review-v1"}
    assert sample("llm_d_epp_request_total", {**labels, "fairness_id": "default-flow", "priority": "0"}) == 1
    decision = {"model_rewrite_name": "alias", "model_name": "food-review", "target_model": "food-review-v1"}
    assert sample("llm_d_epp_model_rewrite_decisions_total", decision) == 1
    assert sample("inference_extension_model_rewrite_decisions_total", decision) == 1


async def test_unmatched_models_take_the_generic_rule(epp: RunningEpp) -> None:
    client, headers, forwarded = await route(epp, "anything-else")
    assert orjson.loads(forwarded)["model"] == "base-model"
    assert headers["content-length"] == str(len(forwarded))
    await client.close()


async def test_weighted_targets_split_requests_by_weight(epp: RunningEpp) -> None:
    """200 requests on a 3:1 split: canary-v2's share is 25% expected, 3.1 points one standard
    deviation; a 50/50 or an all-or-nothing split falls outside 10-40%."""
    counts: Counter[str] = Counter()
    for _ in range(200):
        client, _, forwarded = await route(epp, "canary")
        counts[orjson.loads(forwarded)["model"]] += 1
        await client.close()
    assert set(counts) == {"canary-v1", "canary-v2"}
    assert 0.10 <= counts["canary-v2"] / 200 <= 0.40, counts


async def test_the_rewrite_header_applies_when_no_rule_matches(tmp_path: Path) -> None:
    async with running_epp("--endpoints", "127.0.0.1:9") as epp:  # no rewrites at all
        client, headers, forwarded = await route(epp, "m", **{"x-llm-d-model-name-rewrite": "m-lora"})
        assert orjson.loads(forwarded)["model"] == "m-lora"
        assert headers["content-length"] == str(len(forwarded))
        await client.close()
        # Without a rewrite the body goes back byte for byte.
        client, _, forwarded = await route(epp, "m")
        assert forwarded == orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 4})
        assert await respond(client, b'{"model": "m"}') == b'{"model": "m"}'


LORA_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: lora-affinity-scorer
  - pluginRef: max-score-picker
"""


async def test_scheduling_sees_the_target_model(tmp_path: Path) -> None:
    """lora-affinity-scorer reads the target: a request for the alias goes, every time, to the one
    endpoint running the adapter the alias names (the other's adapter slots are full)."""
    path = tmp_path / "rewrites.yaml"
    path.write_text(
        "kind: InferenceModelRewrite\nmetadata: {name: a}\n"
        "spec: {rules: [{matches: [{model: {value: alias}}], targets: [{modelRewrite: lora-b}]}]}\n"
    )
    flags = ("--endpoints", "127.0.0.1:9,127.0.0.1:10", "--config-text", LORA_CONFIG)
    async with running_epp(*flags, "--inference-model-rewrites-file", str(path)) as epp:
        for ep in epp.app.datastore.endpoints():
            adapter = "lora-b" if ep.port == 10 else "lora-a"
            ep.metrics = EndpointMetrics(running_loras=frozenset({adapter}), max_loras=1)
        for _ in range(10):
            client, headers, _ = await route(epp, "alias")
            assert headers["x-gateway-destination-endpoint"] == "127.0.0.1:10"
            await client.close()
