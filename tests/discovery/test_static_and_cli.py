"""The epp command's flags and standalone endpoint discovery."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from epp.discovery.static import parse_endpoints_flag, parse_endpoints_yaml
from epp.errors import EndpointSpecError
from epp.settings import parse_duration, parse_settings
from tests.support.epp_app import running_epp, wait_until
from tests.support.fake_vllm import FakeVllm


def run_epp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grpc-port", "x", "--endpoints", "a:1"], "port must be an integer"),
        (["--grpc-port", "70000", "--endpoints", "a:1"], "0-65535"),
        (["--refresh-metrics-interval", "fast", "--endpoints", "a:1"], "invalid duration"),
        (["--no-such-flag"], "unrecognized arguments"),
        ([], "no endpoints"),
        (["--endpoints", "hostonly"], "not host:port"),
        (["--endpoints", "a:1,a:1"], "listed twice"),
        (["--endpoints-file", "/nonexistent/eps.yaml"], "cannot read"),
        (["--endpoints", "a:1", "--config-text", "kind: Nope"], "apiVersion"),
    ],
)
def test_bad_flags_exit_non_zero_with_one_line(args: list[str], message: str) -> None:
    result = run_epp(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_a_refresh_interval_below_50ms_is_raised_to_it_with_a_warning() -> None:
    """As the Go EPP's Validate: a values file with 10ms polls every 50 ms, and says so; 0 too."""
    for given in ("10ms", "0"):
        s = parse_settings(["--endpoints", "a:1", "--refresh-metrics-interval", given])
        assert s.refresh_metrics_interval_s == 0.05
        (warning,) = s.start_warnings
        assert "below the minimum of 50ms: 50ms is used" in warning
    assert parse_settings(["--endpoints", "a:1", "--refresh-metrics-interval", "100ms"]).start_warnings == ()


def test_defaults_match_the_go_epp() -> None:
    s = parse_settings(["--endpoints", "a:1"])
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (9002, 9003, 9090)
    assert s.refresh_metrics_interval_s == 0.05 and s.metrics_staleness_threshold_s == 2.0
    # Go's single-dash flags are accepted too.
    assert parse_settings(["-grpc-port=9100", "-endpoints", "a:1"]).grpc_port == 9100


@pytest.mark.parametrize(
    ("text", "seconds"), [("50ms", 0.05), ("2s", 2.0), ("1m30s", 90.0), ("250us", 0.00025), ("1.5", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_endpoint_specs() -> None:
    eps = parse_endpoints_flag("10.0.0.1:8000, [::1]:9000")
    assert [(e.address, e.port, e.key) for e in eps] == [
        ("10.0.0.1", 8000, "10.0.0.1:8000"),
        ("::1", 9000, "[::1]:9000"),
    ]
    yaml_eps = parse_endpoints_yaml(
        "- {address: 10.0.0.2, port: 8000, name: vllm-0, labels: {llm-d.ai/role: decode}}\n", "f.yaml"
    )
    assert yaml_eps[0].name == "vllm-0" and yaml_eps[0].role == "decode"
    for bad, msg in [
        ("{a: 1}", "YAML list"),
        ("- {port: 1}", "address"),
        ("- {address: x}", "'port'"),
        ("- {address: x, port: 0}", "1-65535"),
        ("- {address: x, port: 1, colour: red}", "unknown key"),
        ("- [1]", "mapping"),
        ("- {address: x, port: 1, labels: [a]}", "labels"),
    ]:
        with pytest.raises(EndpointSpecError, match=msg):
            parse_endpoints_yaml(bad, "f.yaml")


def test_an_address_epp_could_not_route_to_is_refused_with_the_reason() -> None:
    """An address is an IP (IPv6 with or without brackets, as --endpoints takes it) or a host name;
    a port written into it, a URL or a bad IP is refused when the file is read, not routed to
    nowhere. Label values read as YAML wrote them."""
    eps = parse_endpoints_yaml(
        "- {address: '[fd00::1]', port: 8000}\n- {address: vllm-0.vllm.ns.svc, port: 8000}\n"
        "- {address: 10.0.0.3, port: 8000, labels: {canary: true, rank: 0, note: null}}\n",
        "f.yaml",
    )
    assert [e.key for e in eps] == ["[fd00::1]:8000", "vllm-0.vllm.ns.svc:8000", "10.0.0.3:8000"]
    assert eps[2].labels == {"canary": "true", "rank": "0", "note": ""}
    for address, msg in [
        ("10.0.0.1:8000", "give the port as 'port'"),
        ("http://10.0.0.1", "not an IP address or a host name"),
        ("1.2.3.999", "not an IP address"),
        ("a b", "not an IP address"),
        ("[fd00::1", "not an IP address"),
    ]:
        with pytest.raises(EndpointSpecError, match=re.escape(msg)):
            parse_endpoints_yaml(f"- {{address: '{address}', port: 8000}}\n", "f.yaml")
    with pytest.raises(EndpointSpecError, match=re.escape("--endpoints: '1.2.3.999:80'")):
        parse_endpoints_flag("1.2.3.999:80")


BILLION_LAUGHS = (
    "- {address: 10.0.0.1, port: 8000, labels: {x: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol],\n"
    + "".join(
        f"    {c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}],\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "  }}\n"
)


def test_a_label_value_that_is_no_text_is_refused_not_expanded() -> None:
    """A list is no label value; with YAML aliases a few hundred bytes of them would be
    gigabytes of text (and seconds of the event loop) if written out."""
    with pytest.raises(EndpointSpecError, match="a label value must be a string or a number"):
        parse_endpoints_yaml("- {address: x, port: 1, labels: {role: [a, b]}}\n", "f.yaml")
    with pytest.raises(EndpointSpecError, match="a label value must be a string or a number") as err:
        parse_endpoints_yaml(BILLION_LAUGHS, "f.yaml")  # 10^9 'lol's written out
    assert len(str(err.value)) < 300


def test_an_ipv6_address_is_written_in_brackets_and_counted_once() -> None:
    for unbracketed in ("fe80::5:8000", "::1:8000"):  # which colon ends the address?
        with pytest.raises(EndpointSpecError, match=re.escape("IPv6 address in brackets")):
            parse_endpoints_flag(unbracketed)
    with pytest.raises(EndpointSpecError, match="listed twice"):
        parse_endpoints_flag("[::1]:8000,[0::1]:8000")
    with pytest.raises(EndpointSpecError, match="listed twice"):
        parse_endpoints_yaml("- {address: '::1', port: 80}\n- {address: '0:0::1', port: 80}\n", "f.yaml")


async def test_endpoints_file_edits_are_picked_up_live(tmp_path: Path) -> None:
    fakes = [await FakeVllm(f"s{i}").start() for i in range(3)]
    path = tmp_path / "endpoints.yaml"

    def write(servers: list[FakeVllm], extra: str = "") -> None:
        lines = [f"- {{address: 127.0.0.1, port: {f.port}, name: {f.name}}}" for f in servers]
        path.write_text("\n".join(lines) + "\n" + extra)

    try:
        write(fakes[:2])
        async with running_epp("--endpoints-file", str(path)) as epp:
            store = epp.app.datastore
            assert {e.key for e in store.endpoints()} == {fakes[0].address, fakes[1].address}
            removed = store.get(fakes[0].address)
            assert removed is not None
            prefix_plugin = next(p for p in epp.app.config.scheduler.plugins if hasattr(p, "index"))
            prefix_plugin.index.add(removed.key, [1, 2, 3])

            write(fakes[1:])
            await wait_until(lambda: store.get(fakes[2].address) is not None, what="file reload")
            assert store.get(fakes[0].address) is None
            assert prefix_plugin.index.match([1]) == {}  # the removed endpoint's blocks are purged
            assert fakes[0].address not in epp.app.scraper.polled()  # and its scrape stopped

            path.write_text("- {address: 127.0.0.1, port: not-a-port}\n")  # a bad edit loses nothing
            await wait_until(
                lambda: (
                    epp.app.discovery._last_stamp is not None
                    and path.stat().st_mtime == epp.app.discovery._last_stamp[0]
                ),
                what="bad file seen",
            )
            assert {e.key for e in store.endpoints()} == {fakes[1].address, fakes[2].address}
    finally:
        for f in fakes:
            await f.stop()
