"""What the Envoy end-to-end fixtures share: the real Envoy binary or a clear failure, and epp
(a subprocess) started behind an Envoy gateway with a client session, each stopped by the
caller's exit stack in reverse order."""

from __future__ import annotations

from contextlib import AsyncExitStack

import aiohttp
import pytest

from epp_bench.gateway import EnvoyGateway, EnvoyNotFoundError, EppProcess, find_envoy_binary


def require_envoy() -> None:
    """Fail (not skip) when the Envoy binary is missing: `make test` installs it."""
    try:
        find_envoy_binary()
    except EnvoyNotFoundError as exc:
        pytest.fail(f"{exc} (the Envoy end-to-end tests need the real binary: run `make tools`)")


async def epp_behind_envoy(
    cleanup: AsyncExitStack,
    epp: EppProcess,
    timeout_s: float,
    connector: aiohttp.BaseConnector | None = None,
) -> tuple[EnvoyGateway, aiohttp.ClientSession]:
    """Start `epp`, an Envoy gateway calling it over ext_proc, and a client session whose
    requests time out after `timeout_s` (on `connector`, else aiohttp's default one); `cleanup`
    stops them."""
    await epp.start()
    cleanup.push_async_callback(epp.stop)
    gateway = EnvoyGateway("epp", epp_grpc_port=epp.grpc_port)
    await gateway.start()
    cleanup.push_async_callback(gateway.stop)
    session = await cleanup.enter_async_context(
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector)
    )
    return gateway, session
