"""The endpoints file under corruption: every bad edit is logged and ignored (the last good set
stays), and the next valid edit is applied; the watcher itself never dies."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from itertools import count
from pathlib import Path

import pytest

from epp.datalayer.datastore import Datastore
from epp.discovery import static
from epp.discovery.static import StaticDiscovery
from epp.supervision import RestartBackoff, Supervisor
from tests.support.epp_app import running_epp, wait_until

_stamps = count(1)


def write(path: Path, data: bytes | str) -> None:
    """Write and give the file a new modification time (two quick edits of the same size must
    still look different to the watcher, whatever the file system's time granularity)."""
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    stamp = 1_700_000_000_000_000_000 + next(_stamps) * 1_000_000
    os.utime(path, ns=(stamp, stamp))


def endpoints_yaml(*ports: int) -> str:
    return "".join(f"- {{address: 127.0.0.1, port: {p}, name: ep-{p}}}\n" for p in ports)


def ports(store: Datastore) -> set[int]:
    return {ep.port for ep in store.endpoints()}


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[Path, Datastore, StaticDiscovery, Supervisor]]:
    path = tmp_path / "endpoints.yaml"
    write(path, endpoints_yaml(8001, 8002))
    store = Datastore()
    supervisor = Supervisor(backoff=RestartBackoff(initial_s=0.01, max_s=0.05))
    discovery = StaticDiscovery(store, path=path, poll_interval_s=0.02, supervisor=supervisor)
    discovery.load_initial()
    discovery.start()
    yield path, store, discovery, supervisor
    await discovery.stop()


CORRUPTIONS = {
    "not UTF-8": (b"- {address: 127.0.0.1, port: 8009, name: \xff\xfe}\n", "not UTF-8 text (byte 0xff"),
    "invalid YAML": ("- {address: 127.0.0.1, port: [8009\n", "not valid YAML"),
    "truncated to nothing": ("", "empty (to remove every endpoint, write [])"),
    "truncated mid-entry": ("- {address: 127.0.0.1, port: 8003}\n- {address: 127.0.", "not valid YAML"),
    "wrong shape": ("address: 127.0.0.1\n", "must be a YAML list"),
    "a bad port": ("- {address: 127.0.0.1, port: 70000}\n", "1-65535"),
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
async def test_a_corrupt_edit_is_ignored_and_the_next_valid_one_applied(
    watched: tuple[Path, Datastore, StaticDiscovery, Supervisor], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, store, discovery, supervisor = watched
    data, reason = CORRUPTIONS[case]
    with caplog.at_level(logging.ERROR, logger="epp.discovery.static"):
        write(path, data)
        await wait_until(lambda: discovery.rejected == 1, what="the corrupt edit seen")
    assert ports(store) == {8001, 8002}  # the last good set stays
    assert "endpoints file change ignored, keeping 2 endpoints" in caplog.text and reason in caplog.text
    write(path, endpoints_yaml(8003))
    await wait_until(lambda: ports(store) == {8003}, what="the valid edit applied")
    assert not supervisor.restarts  # handled, not a crash


async def test_a_deleted_file_keeps_the_endpoints_until_it_is_back(
    watched: tuple[Path, Datastore, StaticDiscovery, Supervisor],
) -> None:
    path, store, discovery, _ = watched
    path.unlink()
    await wait_until(lambda: discovery.rejected == 1, what="the missing file seen")
    assert ports(store) == {8001, 8002}
    write(path, endpoints_yaml(8004, 8005))
    await wait_until(lambda: ports(store) == {8004, 8005}, what="the recreated file applied")
    # Replaced by rename, as editors and ConfigMap updates do.
    staged = path.with_suffix(".tmp")
    write(staged, endpoints_yaml(8006))
    staged.replace(path)
    await wait_until(lambda: ports(store) == {8006}, what="the renamed file applied")


async def test_an_explicit_empty_list_removes_every_endpoint(
    watched: tuple[Path, Datastore, StaticDiscovery, Supervisor],
) -> None:
    path, store, discovery, _ = watched
    write(path, "[]\n")
    await wait_until(lambda: len(store) == 0, what="the empty list applied")
    assert discovery.rejected == 0


async def test_an_oversized_file_is_refused(
    watched: tuple[Path, Datastore, StaticDiscovery, Supervisor],
) -> None:
    path, store, discovery, _ = watched
    write(path, "#" * (static.MAX_FILE_BYTES + 1))
    await wait_until(lambda: discovery.rejected == 1, what="the oversized file seen")
    assert ports(store) == {8001, 8002}


async def test_an_unexpected_error_restarts_the_watcher_which_then_applies_edits(
    watched: tuple[Path, Datastore, StaticDiscovery, Supervisor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, store, _, supervisor = watched
    real = static.read_endpoints_file
    calls = count()

    def flaky(path: Path, *, allow_empty: bool = True) -> list[object]:
        if next(calls) == 0:
            raise RuntimeError("a bug nobody foresaw")
        return real(path, allow_empty=allow_empty)  # type: ignore[return-value]

    monkeypatch.setattr(static, "read_endpoints_file", flaky)
    with caplog.at_level(logging.ERROR, logger="epp.supervision"):
        write(path, endpoints_yaml(8007))
        await wait_until(lambda: supervisor.restarts.get("endpoints-file-watcher") == 1, what="a restart")
    assert "background task endpoints-file-watcher" in caplog.text and "a bug nobody foresaw" in caplog.text
    write(path, endpoints_yaml(8008))
    await wait_until(lambda: ports(store) == {8008}, what="a later edit applied")


async def test_through_epp_non_utf8_bytes_then_a_valid_edit(tmp_path: Path) -> None:
    """The issue's reproduction: a non-UTF-8 edit used to end the watch silently."""
    path = tmp_path / "endpoints.yaml"
    write(path, endpoints_yaml(8011))
    async with running_epp("--endpoints-file", str(path)) as epp:
        discovery = epp.app.discovery
        assert isinstance(discovery, StaticDiscovery)
        write(path, b"\xc3\x28 not utf-8\n")
        await wait_until(lambda: discovery.rejected == 1, what="the bad edit seen")
        write(path, endpoints_yaml(8012, 8013))
        await wait_until(lambda: ports(epp.app.datastore) == {8012, 8013}, what="the valid edit applied")
        assert epp.app.supervisor.restarts == {}
