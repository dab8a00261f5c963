"""Each peer policy the bench runs (epp_bench.peers), as the bench starts it, against 4 real
simulators on loopback: the cache-aware ones keep every group of shared-prefix requests on one pod
at light load; power-of-two routes every request.

vllm-router's cache_aware matches token ids it gets from the workers' render endpoints; without
them it falls back to routing by load, which spreads the concurrent requests of a group over the
pods, so the cache-aware assertions below fail against a simulator that lacks them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import aiohttp
import pytest

from epp_bench.gateway import GatewayError
from epp_bench.peers import PEERS, peer_router, tools_bin
from epp_bench.sim import SERVED_BY, Simulator
from tests.conftest import StartSim

pytestmark = pytest.mark.timeout(60)

SIM_TIME_FACTOR = 0.05  # read by the start_sim fixture
MODEL = "sim-model"
GROUPS = 4
PER_GROUP = 6  # 24 requests a peer: at most 20 in flight over 4 pods, far below any balance threshold
CACHE_AWARE = ("vllm-router", "vllm-router-tuned", "sglang-router")


def system_prompt(group: int) -> str:
    """~1,000 tokens that differ between groups from the first byte on."""
    return f"[group {group}] " + " ".join(f"rule {group}.{i}: be exact." for i in range(220))


def require_binary(name: str) -> None:
    try:
        tools_bin(PEERS[name].binary)
    except GatewayError as exc:
        pytest.skip(f"{PEERS[name].binary} is not installed here ({exc})")


async def send(
    session: aiohttp.ClientSession, base: str, group: int, question: int, chat: bool, max_tokens: int = 2
) -> str:
    """One request of a group through the router; returns the pod that served it."""
    ask = f"Question {question}: what does rule {group}.{question} mean?"
    if chat:
        path = "/v1/chat/completions"
        body = {
            "messages": [
                {"role": "system", "content": system_prompt(group)},
                {"role": "user", "content": ask},
            ]
        }
    else:
        path, body = "/v1/completions", {"prompt": system_prompt(group) + "\n" + ask}
    async with session.post(base + path, json={"model": MODEL, "max_tokens": max_tokens, **body}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers[SERVED_BY]


async def route_groups(base: str, chat: bool) -> dict[int, set[str]]:
    """The first request of every group at once (so a load-aware router spreads the groups: they
    run ~50 ms, long enough to overlap), then the rest of every group at once. Returns group -> the
    pods that served it."""
    pods: dict[int, set[str]] = defaultdict(set)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        firsts = await asyncio.gather(
            *(send(session, base, g, 0, chat, max_tokens=48) for g in range(GROUPS))
        )
        for group, pod in enumerate(firsts):
            pods[group].add(pod)
        rest = [(g, q) for q in range(1, PER_GROUP) for g in range(GROUPS)]
        served = await asyncio.gather(*(send(session, base, g, q, chat) for g, q in rest))
        for (group, _), pod in zip(rest, served, strict=True):
            pods[group].add(pod)
    return pods


async def start_pods(start_sim: StartSim) -> list[Simulator]:
    return [await start_sim(name=f"pod-{i}", kv_cache_blocks=1024) for i in range(4)]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("peer", CACHE_AWARE)
async def test_cache_aware_peer_keeps_each_group_on_one_pod(
    start_sim: StartSim, peer: str, chat: bool
) -> None:
    require_binary(peer)
    sims = await start_pods(start_sim)
    async with peer_router(PEERS[peer], [s.address for s in sims], startup_timeout_s=30) as base:
        pods = await route_groups(base, chat)
    assert all(len(served) == 1 for served in pods.values()), dict(pods)
    assert len(set().union(*pods.values())) >= 2, f"{peer} put every group on one pod: {dict(pods)}"
    # And the pods' own counters agree: every request after a group's first found its system
    # prompt cached (all but the last partial block of it).
    hits = sum(s.stats.prefix_cache_hits for s in sims)
    queries = sum(s.stats.prefix_cache_queries for s in sims)
    system_tokens = len(system_prompt(0).encode()) // 4
    assert hits >= GROUPS * (PER_GROUP - 1) * (system_tokens - 16), (hits, queries)


async def test_power_of_two_routes(start_sim: StartSim) -> None:
    require_binary("power-of-two")
    sims = await start_pods(start_sim)
    async with peer_router(PEERS["power-of-two"], [s.address for s in sims], startup_timeout_s=30) as base:
        pods = await route_groups(base, chat=False)
    served = set().union(*pods.values())
    assert served <= {s.name for s in sims} and len(served) >= 2, dict(pods)
    assert sum(s.stats.requests_succeeded for s in sims) == GROUPS * PER_GROUP
