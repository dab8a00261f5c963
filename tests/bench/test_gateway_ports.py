"""The bench's epp process survives losing a race for its port: free_port() cannot reserve a port,
and on a busy machine another process sometimes binds it first."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from epp_bench import gateway, perf
from epp_bench.gateway import EppProcess


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def test_epp_starts_on_other_ports_when_its_port_was_taken(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_free_port = gateway.free_port
    handed_out: list[int] = []

    def free_port_losing_the_first_race(host: str = "127.0.0.1") -> int:
        port = taken_port if not handed_out else real_free_port(host)
        handed_out.append(port)
        return port

    monkeypatch.setattr(gateway, "free_port", free_port_losing_the_first_race)
    async with EppProcess(["127.0.0.1:1"], extra_args=["--log-level", "warning"]) as epp:
        assert epp.grpc_port != taken_port
        assert handed_out[0] == taken_port and len(handed_out) == 6  # two attempts of three ports


async def test_other_start_failures_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_port = gateway.free_port
    handed_out: list[int] = []

    def counting_free_port(host: str = "127.0.0.1") -> int:
        handed_out.append(real_free_port(host))
        return handed_out[-1]

    monkeypatch.setattr(gateway, "free_port", counting_free_port)
    with pytest.raises(gateway.GatewayError, match="exited with code"):
        async with EppProcess(["127.0.0.1:1"], extra_args=["--no-such-flag"]):
            pass
    assert len(handed_out) == 3  # one attempt


def test_the_perf_commands_epp_starts_on_other_ports_when_its_port_was_taken(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race for the perf commands' epp (`epp_bench extproc`, `scrape`), which start it
    without EppProcess."""
    real_free_port = perf.free_port
    handed_out: list[int] = []

    def free_port_losing_the_first_race(host: str = "127.0.0.1") -> int:
        port = taken_port if not handed_out else real_free_port(host)
        handed_out.append(port)
        return port

    monkeypatch.setattr(perf, "free_port", free_port_losing_the_first_race)
    proc, grpc_port = perf.start_epp(["--endpoints", "127.0.0.1:1"])
    try:
        assert proc.poll() is None and grpc_port != taken_port
        assert handed_out[0] == taken_port and len(handed_out) == 6  # two attempts of three ports
    finally:
        perf.stop(proc)


def test_the_perf_commands_epp_is_not_restarted_for_other_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_port = perf.free_port
    handed_out: list[int] = []

    def counting_free_port(host: str = "127.0.0.1") -> int:
        handed_out.append(real_free_port(host))
        return handed_out[-1]

    monkeypatch.setattr(perf, "free_port", counting_free_port)
    with pytest.raises(SystemExit, match="exited with"):
        perf.start_epp(["--no-such-flag"])
    assert len(handed_out) == 3  # one attempt
