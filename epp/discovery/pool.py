"""What names the endpoint pool in Kubernetes, and how an InferencePool's spec is read.

Two shapes of `InferencePool` are accepted (epp-protocol.md section 2):
- `inference.networking.k8s.io/v1`: `spec.selector.matchLabels` (a map) and
  `spec.targetPorts: [{number: 8000}, ...]` (1-8 ports);
- `inference.networking.x-k8s.io/v1alpha2`: `spec.selector` (a flat map) and
  `spec.targetPortNumber: 8000`.
Only the selector and the ports matter for discovery; the rest of the spec is the gateway's.
Without the CRD, `--endpoint-selector` (a Kubernetes label selector in full syntax: `k=v`, `k!=v`,
`k in (a,b)`, `k notin (a,b)`, `k`, `!k`; see `selector.py`) and `--endpoint-target-ports 8000,...`
give the same two things. This module is pure (no I/O but `default_namespace`), so flag parsing
can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epp.discovery.selector import Selector, SelectorError, parse_selector
from epp.errors import PoolSpecError
from epp.ports import port_number

V1_GROUP = "inference.networking.k8s.io"
V1ALPHA2_GROUP = "inference.networking.x-k8s.io"
# The API version epp reads for each accepted group.
POOL_VERSIONS = {V1_GROUP: "v1", V1ALPHA2_GROUP: "v1alpha2"}
POOL_PLURAL = "inferencepools"
MAX_TARGET_PORTS = 8

SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE_FILE) -> str:
    """The namespace epp runs in (from its service account), else `default`."""
    try:
        namespace = path.read_text().strip()
    except OSError:
        return "default"
    return namespace or "default"


@dataclass(frozen=True, slots=True)
class PoolRef:
    """Which InferencePool to follow."""

    group: str
    namespace: str
    name: str

    @property
    def version(self) -> str:
        return POOL_VERSIONS[self.group]

    def __str__(self) -> str:
        return f"{POOL_PLURAL}.{self.group}/{self.version} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The part of a pool that decides the endpoint set: which pods, which ports.

    `selector` may be given as a map of labels (a pool's matchLabels); it is kept as a Selector."""

    selector: Selector
    target_ports: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.selector, Mapping):
            object.__setattr__(self, "selector", Selector.from_labels(self.selector))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Label selection as the API server applies it."""
        return self.selector.matches(labels)

    def label_selector(self) -> str:
        """The `labelSelector` query value (canonical, so it is stable)."""
        return self.selector.to_query()

    def stable_id(self) -> str:
        """A short name for this selector and ports, the same in every replica given the same flags."""
        text = self.label_selector() + ";" + ",".join(map(str, self.target_ports))
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def _port(value: Any, where: str) -> int:
    try:  # pool specs are JSON: a port is a number, never text
        return port_number(value, allow_text=isinstance(value, str) and where.startswith("--"))
    except ValueError as exc:
        raise PoolSpecError(f"{where}: {exc}") from None


def _check_ports(ports: list[int], where: str) -> tuple[int, ...]:
    if not 1 <= len(ports) <= MAX_TARGET_PORTS:
        raise PoolSpecError(f"{where}: needs 1-{MAX_TARGET_PORTS} target ports, got {len(ports)}")
    if len(set(ports)) != len(ports):
        raise PoolSpecError(f"{where}: target ports must be distinct, got {ports}")
    return tuple(ports)


def _check_selector(selector: Any, where: str) -> Selector:
    if not isinstance(selector, Mapping) or not selector:
        raise PoolSpecError(f"{where}: the selector must be a non-empty map of labels")
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in selector.items()):
        raise PoolSpecError(f"{where}: selector labels and values must be strings")
    try:
        return Selector.from_labels(selector)
    except SelectorError as exc:
        raise PoolSpecError(f"{where}: selector: {exc}") from None


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    """The selector and target ports of an InferencePool object (v1 or v1alpha2 shape)."""
    meta = obj.get("metadata") or {}
    where = f"InferencePool {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PoolSpecError(f"{where}: no spec")
    selector = spec.get("selector")
    if "targetPorts" in spec:  # v1
        if isinstance(selector, Mapping) and "matchLabels" in selector:
            if selector.get("matchExpressions"):
                raise PoolSpecError(f"{where}: selector.matchExpressions is not supported")
            selector = selector.get("matchLabels")
        raw_ports = spec["targetPorts"]
        if not isinstance(raw_ports, list):
            raise PoolSpecError(f"{where}: targetPorts must be a list of {{number: port}}")
        ports = [
            _port(p.get("number") if isinstance(p, Mapping) else None, f"{where}: targetPorts")
            for p in raw_ports
        ]
    elif "targetPortNumber" in spec:  # v1alpha2
        ports = [_port(spec["targetPortNumber"], f"{where}: targetPortNumber")]
    else:
        raise PoolSpecError(f"{where}: spec has neither targetPorts (v1) nor targetPortNumber (v1alpha2)")
    return PoolSpec(_check_selector(selector, where), _check_ports(ports, where))


def parse_selector_flag(text: str) -> Selector:
    """`--endpoint-selector`: a Kubernetes label selector in full syntax, as the Go EPP reads it
    (`app=vllm,tier!=canary`, `app in (vllm,sglang)`, `!experimental`, ...). Raises
    SelectorError (a PoolSpecError) reading `invalid endpoint-selector "…": …`."""
    return parse_selector(text, "endpoint-selector")


def parse_ports_flag(text: str) -> tuple[int, ...]:
    """`--endpoint-target-ports 8000,8001`. A port given twice counts once (the Go EPP's
    removeDuplicatePorts, applied before its 1-8 check), first occurrence first."""
    ports: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise PoolSpecError(f"--endpoint-target-ports: {item!r} is not a port number") from None
        port = _port(value, "--endpoint-target-ports")
        if port not in ports:
            ports.append(port)
    return _check_ports(ports, "--endpoint-target-ports")
