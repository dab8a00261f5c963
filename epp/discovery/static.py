"""Standalone discovery: endpoints from --endpoints or a YAML file that is watched for edits.

File format: a YAML list of mappings
    - address: 10.0.0.5        # required: IP (IPv6 with or without brackets) or host name
      port: 8000               # required
      name: vllm-0             # optional, defaults to address:port
      labels: {llm-d.ai/role: decode}   # optional
A bad edit is logged and ignored: the last good set stays in force. Bad means anything that does
not give a valid endpoint list: bytes that are not UTF-8, invalid YAML, a wrong shape, a file
that is empty (most likely caught in the middle of a write: to remove every endpoint, write
`[]`), missing or unreadable, or larger than 16 MiB. The next valid edit is applied. The file is
read and parsed on a worker thread (a large file costs the event loop nothing), and the watcher
runs under the supervisor (epp.supervision), so even an error nobody foresaw is logged, counted
and followed by a restart rather than ending the watch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from epp.datalayer.datastore import Datastore
from epp.errors import EndpointSpecError, brief
from epp.framework import Endpoint
from epp.ports import port_number
from epp.supervision import Supervisor, current_supervisor

log = logging.getLogger(__name__)

_ENDPOINT_KEYS = {"address", "port", "name", "labels"}
MAX_FILE_BYTES = 16 * 1024 * 1024
# A DNS name (RFC 1123 labels); anything else must be an IP address.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _address(value: str, where: str) -> str:
    """An endpoint's address as epp routes to it: an IP address (an IPv6 one with or without its
    brackets) or a host name; anything else (a port inside it, a URL, spaces) is refused here
    rather than routed to nowhere."""
    address = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(address)
        return address  # as written (the name KV events and logs use for it too)
    except ValueError:
        pass
    if ":" in address or re.fullmatch(r"[0-9.]+", address) or not _HOST_NAME.fullmatch(address):
        hint = " (give the port as 'port')" if re.fullmatch(r"[^:]+:[0-9]+", address) else ""
        raise EndpointSpecError(f"{where}: address {value!r} is not an IP address or a host name{hint}")
    return address


def _label_value(value: Any, where: str) -> str:
    """A label value as YAML wrote it (true, not Python's True; null as empty). A list or a
    mapping is refused: it is no label value (and YAML aliases can make a few hundred bytes of
    it a text of gigabytes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise EndpointSpecError(f"{where}: a label value must be a string or a number, got {brief(value)}")
    return str(value)


def _port(value: Any, where: str) -> int:
    try:
        return port_number(value)
    except ValueError as exc:
        raise EndpointSpecError(f"{where}: {exc}") from None


def _check_unique(endpoints: list[Endpoint], where: str) -> list[Endpoint]:
    seen: set[tuple[str, int]] = set()
    for ep in endpoints:
        try:  # one address written two ways (::1 and 0::1) is one server
            same = (ipaddress.ip_address(ep.address).compressed, ep.port)
        except ValueError:
            same = (ep.address.lower(), ep.port)
        if same in seen:
            raise EndpointSpecError(f"{where}: endpoint {ep.key} is listed twice")
        seen.add(same)
    return endpoints


def parse_endpoints_flag(value: str) -> list[Endpoint]:
    """'host:port,host:port' (IPv6 as [addr]:port)."""
    endpoints = []
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host:
            raise EndpointSpecError(f"--endpoints: {item!r} is not host:port")
        if ":" in host and not host.startswith("["):  # fe80::5:8000: which colon ends the address?
            raise EndpointSpecError(f"--endpoints: {item!r}: write an IPv6 address in brackets, [addr]:port")
        where = f"--endpoints: {item!r}"
        endpoints.append(Endpoint(_address(host, where), _port(port, where)))
    if not endpoints:
        raise EndpointSpecError("--endpoints: no endpoint given")
    return _check_unique(endpoints, "--endpoints")


def parse_endpoints_yaml(text: str, source: str) -> list[Endpoint]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EndpointSpecError(f"{source}: not valid YAML: {exc}".replace("\n", " ")) from None
    if doc is None:
        doc = []
    if isinstance(doc, dict) and "endpoints" in doc:  # also accept {endpoints: [...]}
        doc = doc["endpoints"]
    if not isinstance(doc, list):
        raise EndpointSpecError(f"{source}: must be a YAML list of endpoints (address, port, name, labels)")
    endpoints = []
    for i, item in enumerate(doc):
        where = f"{source}: endpoint {i}"
        if not isinstance(item, dict):
            raise EndpointSpecError(f"{where}: must be a mapping with address and port")
        unknown = set(item) - _ENDPOINT_KEYS
        if unknown:
            raise EndpointSpecError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        address = item.get("address")
        if not isinstance(address, str) or not address:
            raise EndpointSpecError(f"{where}: 'address' must be a non-empty string")
        if "port" not in item:
            raise EndpointSpecError(f"{where}: 'port' is required")
        name = item.get("name", "")
        if not isinstance(name, str):
            raise EndpointSpecError(f"{where}: 'name' must be a string")
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise EndpointSpecError(f"{where}: 'labels' must be a mapping")
        endpoints.append(
            Endpoint(
                _address(address, where),
                _port(item["port"], where),
                name,
                {_label_value(k, where): _label_value(v, where) for k, v in labels.items()},
            )
        )
    return _check_unique(endpoints, source)


def read_endpoints_file(path: Path, *, allow_empty: bool = True) -> list[Endpoint]:
    """The endpoints of a file. Raises EndpointSpecError (unreadable, too large, not UTF-8, not
    a valid list; with `allow_empty` false, also an empty or blank file)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise EndpointSpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise EndpointSpecError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EndpointSpecError(
            f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None
    if not allow_empty and not text.strip():
        raise EndpointSpecError(f"{path}: empty (to remove every endpoint, write [])")
    return parse_endpoints_yaml(text, str(path))


class StaticDiscovery:
    """Feeds the datastore from a fixed list, or from a file it re-reads when it changes."""

    def __init__(
        self,
        datastore: Datastore,
        endpoints: Iterable[Endpoint] = (),
        path: Path | None = None,
        poll_interval_s: float = 0.5,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._datastore = datastore
        self._fixed = list(endpoints)
        self._path = path
        self._poll = poll_interval_s
        self._supervisor = supervisor
        self._last_stamp: tuple[float, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # edits applied
        self.rejected = 0  # edits ignored

    def load_initial(self) -> None:
        """Apply the first set; raises EndpointSpecError so the command can exit with the reason."""
        endpoints = list(self._fixed)
        if self._path is not None:
            self._last_stamp = self._stamp()
            endpoints.extend(read_endpoints_file(self._path))
        self._datastore.replace_all(_check_unique(endpoints, "endpoints"))

    def _stamp(self) -> tuple[float, int, int] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def start(self) -> None:
        if self._path is not None:
            supervisor = self._supervisor or current_supervisor()
            self._task = supervisor.spawn("endpoints-file-watcher", self._watch, detail=str(self._path))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self._last_stamp:
            return False
        self._last_stamp = stamp
        return True

    def _read(self) -> list[Endpoint]:
        assert self._path is not None
        return _check_unique(self._fixed + read_endpoints_file(self._path, allow_empty=False), "endpoints")

    def _apply(self, endpoints: list[Endpoint]) -> None:
        self._datastore.replace_all(endpoints)
        self.reloads += 1
        log.info("endpoints file reloaded: %d endpoints", len(endpoints))

    def _reject(self, exc: EndpointSpecError) -> None:
        self.rejected += 1
        log.error("endpoints file change ignored, keeping %d endpoints: %s", len(self._datastore), exc)

    async def reload(self) -> bool:
        """Re-read the file if it changed (on a worker thread). A bad file keeps the last good set.
        True if applied."""
        if not self._changed():
            return False
        try:
            endpoints = await asyncio.to_thread(self._read)
        except EndpointSpecError as exc:
            self._reject(exc)
            return False
        self._apply(endpoints)
        return True

    async def _watch(self) -> None:
        # Polling the file's stat is portable and cheap, and survives editors that replace the file.
        while True:
            await asyncio.sleep(self._poll)
            await self.reload()
