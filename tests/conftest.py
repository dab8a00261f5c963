"""Fixtures shared across the suite: real simulators on loopback free ports, and a kubeconfig for
the module's own loopback API server (each Kubernetes test module defines its `api` fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp_bench.sim import SimConfig, Simulator, start_simulator
from tests.support.kube_api import KubeApiServer

SIM_MODEL = "sim-model"
StartSim = Callable[..., Awaitable[Simulator]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


@pytest.fixture
async def start_sim(request: pytest.FixtureRequest) -> AsyncIterator[StartSim]:
    """start_sim(**SimConfig knobs) starts a simulator; a test module may set SIM_TIME_FACTOR."""
    sims: list[Simulator] = []
    time_factor = getattr(request.module, "SIM_TIME_FACTOR", 0.02)

    async def start(**knobs: Any) -> Simulator:
        knobs.setdefault("name", f"sim-{len(sims)}")
        knobs.setdefault("model", SIM_MODEL)
        knobs.setdefault("time_factor", time_factor)
        sim = await start_simulator(SimConfig(**knobs))
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.stop()


@pytest.fixture
def kubeconfig(api: KubeApiServer, tmp_path: Path) -> Path:
    """A kubeconfig pointing at the requesting module's `api` (a KubeApiServer fixture)."""
    return api.write_kubeconfig(tmp_path / "kubeconfig")
