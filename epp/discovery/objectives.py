"""InferenceObjectives: the priority a request gets from the objective it names.

A request names its objective in the `x-llm-d-inference-objective` header (the older
`x-gateway-inference-objective` is still read); the objective's `spec.priority` is its priority
(unset, or no such objective: 0, as in the Go EPP). Negative priorities are sheddable.

Objectives come from Kubernetes (group `llm-d.ai`, version `v1alpha2`, in the pool's namespace,
only those whose `spec.poolRef` names our pool: `ObjectiveWatcher`), or, without Kubernetes, from
a YAML file of InferenceObjective manifests (`load_objectives_file`, flag
`--inference-objectives-file`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from epp.discovery.pool_objects import PoolObjectWatcher
from epp.errors import ConfigError, brief

if TYPE_CHECKING:  # kubernetes-asyncio is slow to import: only Kubernetes mode pays for it
    from epp.discovery.kubeclient import KubeClient
    from epp.discovery.reflector import Backoff

log = logging.getLogger(__name__)

OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
OBJECTIVE_GROUP = "llm-d.ai"
OBJECTIVE_VERSION = "v1alpha2"
OBJECTIVE_PLURAL = "inferenceobjectives"
OBJECTIVE_KIND = "InferenceObjective"
MAX_OBJECTIVES = 10_000  # a bound on what a namespace can make epp hold


class ObjectiveStore:
    """Objective name -> priority (None: the objective sets none, so 0)."""

    def __init__(self) -> None:
        self._priorities: dict[str, int | None] = {}
        self.has_negative = False  # some objective is sheddable (kept current on every change)
        self.listeners: list[Callable[[], None]] = []  # told after every change

    def __len__(self) -> int:
        return len(self._priorities)

    def _changed(self) -> None:
        self.has_negative = any(p is not None and p < 0 for p in self._priorities.values())
        for listener in self.listeners:
            listener()

    def priority(self, headers: Mapping[str, str]) -> int:
        """The priority of the objective a request names (0 when it names none we know)."""
        if not self._priorities:
            return 0
        for name in OBJECTIVE_HEADERS:
            value = headers.get(name)
            if value:
                return self._priorities.get(value) or 0
        return 0

    def replace(self, objectives: Mapping[str, int | None]) -> None:
        if len(objectives) > MAX_OBJECTIVES:
            log.warning(
                "%d InferenceObjectives ignored: at most %d are held (their requests get priority 0)",
                len(objectives) - MAX_OBJECTIVES,
                MAX_OBJECTIVES,
            )
        self._priorities = dict(list(objectives.items())[:MAX_OBJECTIVES])
        self._changed()

    def put(self, name: str, priority: int | None) -> None:
        if name in self._priorities or len(self._priorities) < MAX_OBJECTIVES:
            self._priorities[name] = priority
            self._changed()
        else:
            log.warning("InferenceObjective %s ignored: already %d held", brief(name), MAX_OBJECTIVES)

    def delete(self, name: str) -> None:
        self._priorities.pop(name, None)
        self._changed()


def _priority_of(obj: Mapping[str, Any], where: str) -> int | None:
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: spec must be a mapping, got {brief(spec)}")
    priority = spec.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ConfigError(f"{where}: spec.priority must be an integer, got {priority!r}")
    return priority


def parse_objectives(docs: Iterable[Any], source: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{source} document {i + 1}"
        if not isinstance(doc, Mapping) or doc.get("kind") != OBJECTIVE_KIND:
            raise ConfigError(f"{where}: expected kind {OBJECTIVE_KIND}, got {brief(doc)}")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise ConfigError(f"{where}: metadata must be a mapping, got {brief(metadata)}")
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: metadata.name is required")
        out[name] = _priority_of(doc, where)
    return out


def load_objectives_file(path: str) -> dict[str, int | None]:
    """InferenceObjective manifests (multi-document YAML) from a file; ConfigError if unusable."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--inference-objectives-file {path}: {exc.strerror}") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--inference-objectives-file {path}: not valid YAML: {exc}") from None
    return parse_objectives(docs, path)


class ObjectiveWatcher(PoolObjectWatcher[tuple[str, int | None]]):
    """Keeps an ObjectiveStore in step with the InferenceObjectives of one pool."""

    kind = OBJECTIVE_KIND
    task = "inference-objectives"
    group = OBJECTIVE_GROUP
    version = OBJECTIVE_VERSION
    plural = OBJECTIVE_PLURAL

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pool_name: str,
        pool_group: str,
        store: ObjectiveStore,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        super().__init__(client, namespace, pool_name, pool_group, backoff)

    def parse(self, obj: Mapping[str, Any], name: str) -> tuple[str, int | None]:
        return name, _priority_of(obj, f"InferenceObjective {name}")

    def replace(self, entries: list[tuple[str, int | None]]) -> None:
        self.store.replace(dict(entries))

    def put(self, entry: tuple[str, int | None]) -> None:
        self.store.put(*entry)

    def delete(self, name: str) -> None:
        self.store.delete(name)

    def __len__(self) -> int:
        return len(self.store)
