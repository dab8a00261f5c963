"""Standalone discovery: endpoints from --endpoints or a YAML file that is watched for edits.

File format: a YAML list of mappings
    - address: 10.0.0.5        # required: IP or host name
      port: 8000               # required
      name: vllm-0             # optional, defaults to address:port
      labels: {llm-d.ai/role: decode}   # optional
A bad edit is logged and ignored: the last good set stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from epp.datalayer.datastore import Datastore
from epp.errors import EndpointSpecError
from epp.framework import Endpoint
from epp.ports import port_number

log = logging.getLogger(__name__)

_ENDPOINT_KEYS = {"address", "port", "name", "labels"}


def _port(value: Any, where: str) -> int:
    try:
        return port_number(value)
    except ValueError as exc:
        raise EndpointSpecError(f"{where}: {exc}") from None


def _check_unique(endpoints: list[Endpoint], where: str) -> list[Endpoint]:
    seen: set[str] = set()
    for ep in endpoints:
        if ep.key in seen:
            raise EndpointSpecError(f"{where}: endpoint {ep.key} is listed twice")
        seen.add(ep.key)
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
        endpoints.append(Endpoint(host.strip("[]"), _port(port, f"--endpoints: {item!r}")))
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
            Endpoint(address, _port(item["port"], where), name, {str(k): str(v) for k, v in labels.items()})
        )
    return _check_unique(endpoints, source)


def read_endpoints_file(path: Path) -> list[Endpoint]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise EndpointSpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_endpoints_yaml(text, str(path))


class StaticDiscovery:
    """Feeds the datastore from a fixed list, or from a file it re-reads when it changes."""

    def __init__(
        self,
        datastore: Datastore,
        endpoints: Iterable[Endpoint] = (),
        path: Path | None = None,
        poll_interval_s: float = 0.5,
    ) -> None:
        self._datastore = datastore
        self._fixed = list(endpoints)
        self._path = path
        self._poll = poll_interval_s
        self._last_stamp: tuple[float, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

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
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def reload(self) -> bool:
        """Re-read the file if it changed. A bad file keeps the last good set. True if applied."""
        stamp = self._stamp()
        if stamp == self._last_stamp:
            return False
        self._last_stamp = stamp
        assert self._path is not None
        try:
            endpoints = _check_unique(self._fixed + read_endpoints_file(self._path), "endpoints")
        except EndpointSpecError as exc:
            log.error("endpoints file change ignored, keeping %d endpoints: %s", len(self._datastore), exc)
            return False
        self._datastore.replace_all(endpoints)
        log.info("endpoints file reloaded: %d endpoints", len(endpoints))
        return True

    async def _watch(self) -> None:
        # Polling the file's stat is portable and cheap, and survives editors that replace the file.
        while True:
            await asyncio.sleep(self._poll)
            self.reload()
