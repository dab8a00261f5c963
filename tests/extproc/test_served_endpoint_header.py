"""--emit-served-endpoint-header over a real gRPC stream: the response names the endpoint that
served (Envoy's `envoy.lb` report when it gives one, else epp's pick); off by default."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from epp.requestcontrol.director import SERVED_ENDPOINT_HEADER
from tests.support.epp_app import running_epp
from tests.support.extproc_client import ExtProcClient, exchange
from tests.support.fake_vllm import FakeVllm

SESSION_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: session-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: session-affinity-scorer, weight: 10}
"""


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeVllm]]:
    servers = [await FakeVllm(f"s{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


async def test_the_header_names_the_picked_endpoint(fakes: list[FakeVllm]) -> None:
    addresses = [f.address for f in fakes]
    async with running_epp("--endpoints", ",".join(addresses), "--emit-served-endpoint-header") as epp:
        for _ in range(3):
            destination, added = await exchange(ExtProcClient(epp.stub))
            assert added == {SERVED_ENDPOINT_HEADER: destination}
            assert destination in addresses


async def test_envoys_report_of_the_served_endpoint_wins(fakes: list[FakeVllm]) -> None:
    addresses = [f.address for f in fakes]
    async with running_epp("--endpoints", ",".join(addresses), "--emit-served-endpoint-header=true") as epp:
        destination, _ = await exchange(ExtProcClient(epp.stub))
        fallback = next(a for a in addresses if a != destination)
        # Envoy says a fallback served (epp's pick failed over): the header follows Envoy.
        _, added = await exchange(ExtProcClient(epp.stub), served=fallback)
        assert added[SERVED_ENDPOINT_HEADER] == fallback


async def test_off_by_default_and_beside_plugin_headers(fakes: list[FakeVllm]) -> None:
    addresses = ",".join(f.address for f in fakes)
    async with running_epp("--endpoints", addresses) as epp:
        _, added = await exchange(ExtProcClient(epp.stub))
        assert added == {}
    async with running_epp(
        "--endpoints", addresses, "--config-text", SESSION_CONFIG, "--emit-served-endpoint-header"
    ) as epp:
        destination, added = await exchange(ExtProcClient(epp.stub))
        assert set(added) == {"x-session-token", SERVED_ENDPOINT_HEADER}
        assert added[SERVED_ENDPOINT_HEADER] == destination


def test_the_flag_takes_go_booleans() -> None:
    from epp.settings import parse_settings

    base = ["--endpoints", "127.0.0.1:8000"]
    assert parse_settings(base).emit_served_endpoint_header is False
    assert parse_settings([*base, "--emit-served-endpoint-header"]).emit_served_endpoint_header is True
    off = parse_settings([*base, "--emit-served-endpoint-header=false"])
    assert off.emit_served_endpoint_header is False
    with pytest.raises(SystemExit):
        parse_settings([*base, "--emit-served-endpoint-header=maybe"])
