"""Active-passive HA: epp replicas contend for a coordination.k8s.io Lease on the loopback API server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from kubernetes_asyncio.client import CoordinationV1Api

from epp.discovery.kubeclient import KubeClient, resolve_config_source
from epp.discovery.leader import LeaderElector, LeaseTiming
from tests.support.epp_app import RunningEpp, wait_until
from tests.support.kube_api import (
    LEASES,
    PODS,
    POOLS_V1,
    KubeApiServer,
    endpoint_keys,
    health,
    inference_pool,
    pod,
    running_k8s_epp,
    wait_for_health,
)

LEASE = "epp-default-pool.llm-d.ai"  # the Go EPP's name (llm-d-router)
HA = ("--pool-name", "pool", "--ha-enable-leader-election", "--ha-retry-period", "100ms")
FAST_LEASE = (*HA, "--ha-lease-duration", "1s", "--ha-renew-deadline", "600ms")


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    server.put(POOLS_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    server.put(PODS, pod("a", "127.0.1.1", {"app": "vllm"}))
    yield server
    await server.stop()


def holder(api: KubeApiServer) -> str | None:
    lease = api.get(LEASES, LEASE)
    return None if lease is None else lease["spec"].get("holderIdentity")


def identity(epp: RunningEpp) -> str:
    assert epp.app.leader is not None
    return epp.app.leader.identity


async def wait_for_one_leader(
    api: KubeApiServer, pair: list[RunningEpp], timeout: float = 5.0
) -> tuple[RunningEpp, RunningEpp]:
    """Wait until exactly one replica is SERVING and holds the Lease; return (leader, standby)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [await health(e) for e in pair]
        if sorted(states) == ["NOT_SERVING", "SERVING"]:
            leader = pair[states.index("SERVING")]
            standby = pair[1 - states.index("SERVING")]
            if holder(api) == identity(leader):
                return leader, standby
        if time.monotonic() > deadline:
            raise AssertionError(f"no single leader within {timeout}s: {states}")
        await asyncio.sleep(0.02)


async def test_one_leader_and_takeover_when_its_lease_expires(api: KubeApiServer, kubeconfig: Path) -> None:
    async with AsyncExitStack() as stack:
        pair = [await stack.enter_async_context(running_k8s_epp(kubeconfig, *FAST_LEASE)) for _ in range(2)]
        leader, standby = await wait_for_one_leader(api, pair)
        # Both replicas keep a warm, complete endpoint set; only the leader says ready.
        await wait_until(
            lambda: all(endpoint_keys(e) == {"127.0.1.1:8000"} for e in pair), what="both synced"
        )
        lease = api.get(LEASES, LEASE)
        assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 1
        await asyncio.sleep(0.5)  # renewals keep it that way
        assert (await health(leader), await health(standby)) == ("SERVING", "NOT_SERVING")

        # The leader loses the API server (a network partition): it cannot renew, steps down after
        # the renew deadline, and the standby takes over once the lease has expired.
        api.partition(identity(leader))
        started = time.monotonic()
        await wait_for_health(leader, "NOT_SERVING")
        await wait_for_health(standby, "SERVING")
        assert 0.5 < time.monotonic() - started < 4.0  # about the 1 s lease, not at once
        assert holder(api) == identity(standby)
        lease = api.get(LEASES, LEASE)
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1

        # The old leader comes back: it finds the lease held and stays standby.
        api.heal(identity(leader))
        await asyncio.sleep(0.5)
        assert (await health(leader), await health(standby)) == ("NOT_SERVING", "SERVING")


async def test_a_stopping_leader_releases_the_lease(api: KubeApiServer, kubeconfig: Path) -> None:
    long_lease = (*HA, "--ha-lease-duration", "10s", "--ha-renew-deadline", "5s")
    async with AsyncExitStack() as first_stack:
        first = await first_stack.enter_async_context(running_k8s_epp(kubeconfig, *long_lease))
        await wait_for_health(first, "SERVING")
        async with running_k8s_epp(kubeconfig, *long_lease) as second:
            await asyncio.sleep(0.3)
            assert await health(second) == "NOT_SERVING"
            started = time.monotonic()
            await first_stack.aclose()  # a rolling update stops the leader
            await wait_for_health(second, "SERVING")
            assert time.monotonic() - started < 3.0  # well inside the 10 s lease: it was released
            assert holder(api) == identity(second)


async def test_ha_replica_is_ready_only_after_sync_and_with_the_lease(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    api.delete(POOLS_V1, "pool")
    async with running_k8s_epp(kubeconfig, *FAST_LEASE) as epp:
        await wait_until(lambda: holder(api) == identity(epp), what="lease acquired")
        assert await health(epp) == "NOT_SERVING"  # leader, but there is no pool to serve
        api.put(POOLS_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
        await wait_for_health(epp, "SERVING")


async def test_racing_electors_one_wins(api: KubeApiServer, kubeconfig: Path) -> None:
    client = KubeClient(resolve_config_source(kubeconfig))
    timing = LeaseTiming(1.0, 0.6, 0.1)
    electors = [LeaderElector(client, "default", "race", f"replica-{i}", timing) for i in range(4)]
    try:
        # All read "no lease" and create at once: the API server accepts one create (409 for the rest).
        results = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors))
        assert results.count(True) == 1
        winner = electors[results.index(True)]
        # Renewing replaces the Lease under its resourceVersion; the others see it held.
        assert await winner.try_acquire_or_renew()
        assert [await e.try_acquire_or_renew() for e in electors if e is not winner] == [False] * 3
        lease = api.get(LEASES, "race")
        assert lease is not None and lease["spec"]["holderIdentity"] == winner.identity
        # A stale write (an old resourceVersion) is refused with 409 Conflict, not applied.
        stale = dict(lease, metadata={**lease["metadata"], "resourceVersion": "1"})
        stale["spec"] = {**lease["spec"], "holderIdentity": "intruder"}
        resp = await CoordinationV1Api(await client.api()).replace_namespaced_lease(
            "race", "default", stale, _preload_content=False
        )
        assert resp.status == 409
        resp.release()
        assert api.get(LEASES, "race")["spec"]["holderIdentity"] == winner.identity  # type: ignore[index]
    finally:
        await client.close()


def test_selector_mode_lease_is_named_after_the_pods_deployment() -> None:
    from epp.discovery.leader import deployment_of_pod

    assert deployment_of_pod("vllm-epp-7d4b9c8f6d-x2x9z") == "vllm-epp"
    assert deployment_of_pod("epp-0") is None and deployment_of_pod(None) is None


async def test_stop_is_not_lost_when_it_lands_as_an_attempt_completes() -> None:
    """A stop whose cancel arrives in the same loop turn an attempt finishes (seen in CI as a
    replica that never stopped) still ends the election loop."""
    elector = LeaderElector(None, "default", "race", "replica", LeaseTiming(1.0, 0.6, 30.0))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    async def attempt() -> bool:
        if not stopping:  # the first attempt ends just as the replica is told to stop
            loop.call_soon(lambda: stopping.append(loop.create_task(elector.stop(release=False))))
        return False

    elector.try_acquire_or_renew = attempt  # type: ignore[method-assign]
    elector.start()
    await wait_until(lambda: bool(stopping), what="the stop to be issued")
    # Otherwise the loop would sleep out its 30 s retry period and attempt again.
    await asyncio.wait_for(stopping[0], 2.0)


async def test_a_stop_that_cut_an_acquire_short_still_releases_the_lease(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    """The API server took the write, the replica was stopped before it read the answer: it never
    knew it led, and the Lease names it. Stopping releases it all the same (a standby takes over
    at once instead of after the lease's duration); a Lease naming another replica is left alone."""
    client = KubeClient(resolve_config_source(kubeconfig))
    timing = LeaseTiming(15.0, 10.0, 2.0)
    cut, other = (LeaderElector(client, "default", LEASE, name, timing) for name in ("cut", "other"))
    try:
        assert await cut.try_acquire_or_renew()  # as the API server recorded it
        cut.is_leader = False  # the answer never reached the replica
        await other.stop()
        assert holder(api) == "cut"
        await cut.stop()
        assert holder(api) == ""
    finally:
        await client.close()
