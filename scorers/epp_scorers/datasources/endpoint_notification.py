"""`endpoint-notification-source`: tells the precise prefix-cache plugins which pods are in the
pool, so that they subscribe to each pod's KV events and forget a pod that leaves.

In upstream's data layer this source notifies the extractors wired to it (`dataLayer.sources`:
`- pluginRef: endpoint-notification-source, extractors: [precise-prefix-cache-producer]`). In epp
it follows the pool's endpoints (as discovery finds them) and calls every configured
`precise-prefix-cache-producer` / `precise-prefix-cache-scorer`, which then do not follow the pool
themselves. Without this plugin they follow it on their own: the result is the same.

Consumes: nothing. Produces: nothing. Parameters: none.

    plugins:
    - type: endpoint-notification-source
    - type: precise-prefix-cache-producer
    dataLayer:
      sources:
      - pluginRef: endpoint-notification-source
        extractors:
        - pluginRef: precise-prefix-cache-producer
"""

from __future__ import annotations

from epp.framework import BackgroundService, DataSource, Endpoint, PluginHandle, ServiceContext
from epp_scorers.producers.precise_prefix import PreciseBase


class EndpointNotificationSource(DataSource, BackgroundService):
    """Tells the precise prefix-cache plugins of the pods joining and leaving the pool."""

    type_name = "endpoint-notification-source"

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.listeners: list[PreciseBase] = []
        self._subscribed = False

    def bind(self, handle: PluginHandle) -> list[str]:
        self.listeners = [p for p in handle.plugins.values() if isinstance(p, PreciseBase)]
        for listener in self.listeners:
            listener.notified = True
        if not self.listeners:
            return ["no precise prefix-cache plugin is configured: nothing to notify"]
        return []

    async def run(self, context: ServiceContext) -> None:
        if self._subscribed:  # started again by the supervisor: the subscription stands
            return
        self._subscribed = True
        context.subscribe(self._added, self._removed)
        for endpoint in context.endpoints():
            self._added(endpoint)

    def _added(self, endpoint: Endpoint) -> None:
        for listener in self.listeners:
            listener.endpoint_added(endpoint)

    def _removed(self, endpoint: Endpoint) -> None:
        for listener in self.listeners:
            listener.endpoint_removed(endpoint)
