"""The watch both InferenceObjectives and InferenceModelRewrites use: the namespace's custom
objects of one kind, listed and watched with the project's Reflector, keeping only those whose
`spec.poolRef` names our pool. An object that does not parse is logged and skipped (the watch
goes on); one deleted, moved to another pool or made invalid leaves the store."""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from epp.errors import ConfigError

if TYPE_CHECKING:  # kubernetes-asyncio is slow to import: only Kubernetes mode pays for it
    import aiohttp

    from epp.discovery.kubeclient import KubeClient
    from epp.discovery.reflector import Backoff

log = logging.getLogger(__name__)

DEFAULT_POOL_GROUP = "inference.networking.k8s.io"  # spec.poolRef.group's default

T = TypeVar("T")


def object_name(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) and name else None


class PoolObjectWatcher(abc.ABC, Generic[T]):
    """Keeps a store in step with one kind of custom object of one pool. Subclasses name the
    kind (group, version, plural), parse an object (ConfigError when invalid) and write the
    store."""

    kind: ClassVar[str]
    task: ClassVar[str]  # the supervised task's name (epp_background_task_restarts_total{task})
    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pool_name: str,
        pool_group: str,
        backoff: Backoff | None = None,
    ) -> None:
        from epp.discovery.reflector import Backoff, Reflector

        self.client = client
        self.namespace = namespace
        self.pool_name = pool_name
        self.pool_group = pool_group
        self.reflector = Reflector(
            f"{self.kind}s ({self.group}/{self.version}) in {namespace}",
            self._open,
            self._listed,
            self._event,
            backoff or Backoff(),
            task=self.task,
        )

    @abc.abstractmethod
    def parse(self, obj: Mapping[str, Any], name: str) -> T:
        """The store's entry for a valid object; ConfigError when it is not."""

    @abc.abstractmethod
    def replace(self, entries: list[T]) -> None: ...

    @abc.abstractmethod
    def put(self, entry: T) -> None: ...

    @abc.abstractmethod
    def delete(self, name: str) -> None: ...

    @abc.abstractmethod
    def __len__(self) -> int:
        """Entries in the store."""

    async def _open(self, **query: Any) -> aiohttp.ClientResponse:
        from kubernetes_asyncio.client import CustomObjectsApi

        from epp.discovery.kubeclient import raw_response

        api = CustomObjectsApi(await self.client.api())
        return await raw_response(
            api.list_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, _preload_content=False, **query
            )
        )

    def _ours(self, obj: Mapping[str, Any]) -> bool:
        spec = obj.get("spec")
        ref = spec.get("poolRef") if isinstance(spec, Mapping) else None
        if not isinstance(ref, Mapping):
            return False
        group = ref.get("group") or DEFAULT_POOL_GROUP
        return bool(ref.get("name") == self.pool_name and group == self.pool_group)

    def _parsed(self, obj: Mapping[str, Any]) -> T | None:
        name = object_name(obj)
        if name is None or not self._ours(obj):
            return None
        try:
            return self.parse(obj, name)
        except ConfigError as exc:
            log.warning("%s: ignored", exc)
            return None

    def _listed(self, items: list[dict[str, Any]]) -> None:
        parsed = (self._parsed(obj) for obj in items)
        self.replace([entry for entry in parsed if entry is not None])
        log.info("%ss for pool %s: %d", self.kind, self.pool_name, len(self))

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        name = object_name(obj)
        if name is None:
            return
        entry = None if kind == "DELETED" else self._parsed(obj)
        if entry is None:
            self.delete(name)  # deleted, invalid now, or its poolRef moved to another pool
        else:
            self.put(entry)
