"""P/D in the bench: simulator roles and remote prefill, and the routing sidecar in front of a
decode simulator, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.sidecar import PREFILL_HEADER, PREFILLED_BY, Sidecar
from epp_bench.sim import BLOCK_SIZE_TOKENS, SERVED_BY, Simulator
from tests.conftest import StartSim

pytestmark = pytest.mark.timeout(30)

MODEL = "sim-model"
REMOTE_PREFILL = {"kv_transfer_params": {"do_remote_prefill": True}}
REMOTE_DECODE = {"kv_transfer_params": {"do_remote_decode": True}}

SIM_TIME_FACTOR = 0.05  # real seconds per simulated second (see tests/conftest.py)


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[[Simulator], Awaitable[Sidecar]]]:
    sidecars: list[Sidecar] = []

    async def start(decode: Simulator) -> Sidecar:
        sidecar = await Sidecar(decode.address).start()
        sidecars.append(sidecar)
        return sidecar

    yield start
    for sidecar in sidecars:
        await sidecar.stop()


def document(tokens: int, tag: str = "doc ") -> str:
    return (tag * tokens)[: tokens * 4]


async def post(
    session: aiohttp.ClientSession, address: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {"model": MODEL, **body}
    async with session.post(f"http://{address}/v1/completions", json=body, headers=headers or {}) as resp:
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


async def metric(session: aiohttp.ClientSession, sim: Simulator, name: str) -> float:
    async with session.get(f"http://{sim.address}/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    )


# --- simulator roles -----------------------------------------------------------------------------


async def test_prefill_instance_returns_what_the_decode_side_needs(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(name="p", role="prefill")
    status, headers, body = await post(
        session, prefill.address, {"prompt": document(100), "max_tokens": 1, **REMOTE_DECODE}
    )
    assert status == 200 and headers[SERVED_BY] == "p"
    assert body["choices"][0]["finish_reason"] == "remote_decode"
    assert body["usage"]["completion_tokens"] == 1
    params = body["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_engine_id"], params["remote_port"]) == ("p", prefill.port)
    assert len(params["remote_block_ids"]) == 100 // BLOCK_SIZE_TOKENS
    # The prefill pod keeps the prompt in its prefix cache.
    await post(session, prefill.address, {"prompt": document(100), "max_tokens": 1, **REMOTE_DECODE})
    assert prefill.stats.prefix_cache_hits == 96


@pytest.mark.parametrize(
    ("role", "params", "reason"),
    [
        ("prefill", {"do_remote_prefill": True}, "does not take remote KV"),
        ("decode", {"do_remote_decode": True}, "does not prefill for others"),
        ("both", {"do_remote_prefill": True, "do_remote_decode": True}, "exclusive"),
    ],
)
async def test_roles_refuse_what_they_cannot_do(
    start_sim: StartSim, session: aiohttp.ClientSession, role: str, params: dict[str, bool], reason: str
) -> None:
    sim = await start_sim(role=role)
    status, _, body = await post(session, sim.address, {"prompt": "hi", "kv_transfer_params": params})
    assert status == 400 and reason in body["error"]["message"]


async def test_remote_prefill_costs_the_kv_transfer_not_the_prefill(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    # 2,000 prompt tokens: a local prefill takes 15 ms + 500 ms; pulling the KV at 0.1 ms a token
    # takes 200 ms, then one decode step (20 ms) samples the first token. Real time (factor 1):
    # a late wake-up of the engine on a loaded machine then adds to the TTFT only what it lasts.
    knobs = {"time_factor": 1.0, "kv_transfer_time_per_token_s": 0.0001}
    local, decode = await start_sim(name="local", **knobs), await start_sim(name="d", role="decode", **knobs)
    ttft = "vllm:time_to_first_token_seconds_sum"
    prompt = document(2000)
    await post(session, local.address, {"prompt": prompt, "max_tokens": 2})
    status, _, body = await post(
        session, decode.address, {"prompt": prompt, "max_tokens": 2, **REMOTE_PREFILL}
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert await metric(session, local, ttft) >= 0.5
    remote = await metric(session, decode, ttft)
    assert 0.2 <= remote < 0.5  # about 0.22 s; a local prefill takes over 0.5
    # Only what the decode instance lacks crosses the network: the same prompt again is cached
    # (about 0.02 s; the transfer alone would be 0.2).
    await post(session, decode.address, {"prompt": prompt, "max_tokens": 2, **REMOTE_PREFILL})
    assert await metric(session, decode, ttft) - remote < 0.18
    # The transferred KV was allocated and stays cached, as a local prefill's would.
    _, _, plain = await post(session, decode.address, {"prompt": prompt, "max_tokens": 2})
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 1984


async def test_kv_in_flight_counts_as_waiting_and_holds_blocks(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    decode = await start_sim(role="decode", time_factor=0.5, kv_transfer_time_per_token_s=0.01)
    task = asyncio.create_task(post(session, decode.address, {"prompt": document(320), **REMOTE_PREFILL}))
    # Admitted at once; the transfer takes 320 x 10 ms x 0.5 = 1.6 s: room for two scrapes on a
    # loaded machine before it lands.
    async with asyncio.timeout(5):
        while decode.engine.kv.used_blocks == 0:
            await asyncio.sleep(0.005)
    assert await metric(session, decode, "vllm:num_requests_waiting") == 1
    assert await metric(session, decode, "vllm:num_requests_running") == 0
    assert decode.engine.kv.used_blocks == -(-(320 + 16) // BLOCK_SIZE_TOKENS)
    status, _, _ = await task
    assert status == 200
    assert decode.engine.kv.used_blocks == 0


async def test_client_leaving_during_the_transfer_frees_the_blocks(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    decode = await start_sim(role="decode", time_factor=1.0, kv_transfer_time_per_token_s=0.01)
    body = {"model": MODEL, "prompt": document(500), "stream": True, **REMOTE_PREFILL}
    async with session.post(f"http://{decode.address}/v1/completions", json=body) as resp:
        assert resp.status == 200  # a stream's headers go out at once; its KV is still in flight
        assert decode.engine.num_waiting == 1 and decode.engine.kv.used_blocks > 0
        resp.close()
    async with asyncio.timeout(5):
        while decode.stats.requests_aborted == 0:
            await asyncio.sleep(0.005)
    assert decode.engine.num_waiting == 0 and decode.engine.kv.used_blocks == 0


# --- the routing sidecar -------------------------------------------------------------------------


async def test_sidecar_has_the_prefill_pod_prefill_then_decodes_locally(
    start_sim: StartSim,
    start_sidecar: Callable[[Simulator], Awaitable[Sidecar]],
    session: aiohttp.ClientSession,
) -> None:
    prefill, decode = await start_sim(name="p0", role="prefill"), await start_sim(name="d0", role="decode")
    sidecar = await start_sidecar(decode)
    body = {
        "model": MODEL,
        "prompt": document(600),
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {PREFILL_HEADER: prefill.address}
    async with session.post(f"http://{sidecar.address}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert (resp.headers[SERVED_BY], resp.headers[PREFILLED_BY]) == ("d0", "p0")
        assert resp.headers["content-type"] == "text/event-stream"
        events = [line.strip() async for line in resp.content if line.strip()]
    assert events[-1] == b"data: [DONE]"
    usage = orjson.loads(events[-2].removeprefix(b"data: "))["usage"]
    assert usage["completion_tokens"] == 5
    # The prefill pod computed the prompt and generated one token; the decode pod computed none
    # of the prompt but its last token, and generated the answer.
    assert (prefill.stats.requests_succeeded, prefill.stats.generation_tokens) == (1, 1)
    assert prefill.stats.prompt_tokens == 600
    assert decode.stats.generation_tokens == 5
    assert decode.stats.prefix_cache_hits == 0
    assert sidecar.prefills == 1


async def test_sidecar_without_the_header_only_decodes(
    start_sim: StartSim,
    start_sidecar: Callable[[Simulator], Awaitable[Sidecar]],
    session: aiohttp.ClientSession,
) -> None:
    prefill, decode = await start_sim(role="prefill"), await start_sim(name="d0", role="decode")
    sidecar = await start_sidecar(decode)
    status, headers, body = await post(session, sidecar.address, {"prompt": "short", "max_tokens": 3})
    assert status == 200 and headers[SERVED_BY] == "d0" and PREFILLED_BY not in headers
    assert body["usage"]["completion_tokens"] == 3
    assert prefill.stats.requests_received == 0 and sidecar.prefills == 0


async def test_sidecar_passes_other_paths_through(
    start_sim: StartSim,
    start_sidecar: Callable[[Simulator], Awaitable[Sidecar]],
    session: aiohttp.ClientSession,
) -> None:
    decode = await start_sim(name="d0", role="decode", kv_cache_blocks=321)
    sidecar = await start_sidecar(decode)
    async with session.get(f"http://{sidecar.address}/metrics") as resp:
        assert resp.status == 200 and resp.headers[SERVED_BY] == "d0"
        assert 'num_gpu_blocks="321"' in await resp.text()
    async with session.get(f"http://{sidecar.address}/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == MODEL


async def test_sidecar_reports_a_failed_prefill(
    start_sim: StartSim,
    start_sidecar: Callable[[Simulator], Awaitable[Sidecar]],
    session: aiohttp.ClientSession,
) -> None:
    other_decode, decode = await start_sim(role="decode"), await start_sim(role="decode")
    sidecar = await start_sidecar(decode)
    # A decode instance named as the prefill pod refuses: its error reaches the client.
    status, _, body = await post(
        session, sidecar.address, {"prompt": "hi"}, {PREFILL_HEADER: other_decode.address}
    )
    assert status == 400 and "does not prefill for others" in body["error"]["message"]
    status, _, body = await post(session, sidecar.address, {"prompt": "hi"}, {PREFILL_HEADER: "127.0.0.1:1"})
    assert status == 502 and "prefill at 127.0.0.1:1 failed" in body["error"]["message"]
    status, _, body = await post(session, sidecar.address, {"prompt": "hi"}, {PREFILL_HEADER: "nonsense"})
    assert status == 400
    assert decode.stats.requests_received == 0
