"""The set of endpoints epp may route to. Discovery writes it; the scheduler reads it.

Readers get a cached tuple rebuilt only when the set (or an endpoint's name or labels) changes,
so a pick never copies endpoint state, and the scraped metrics the in-tree scorers read as numpy
columns aligned with it
(`epp.framework.metric_columns`), rebuilt with the tuple; a scrape writes its endpoint's row.
Components that keep per-endpoint state (scraper, prefix index) subscribe to changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from epp.framework import Endpoint
from epp.framework.columns import EndpointColumns

log = logging.getLogger(__name__)

EndpointCallback = Callable[[Endpoint], None]


class Datastore:
    def __init__(self) -> None:
        self._by_key: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._columns = EndpointColumns(())
        self._on_added: list[EndpointCallback] = []
        self._on_removed: list[EndpointCallback] = []
        self.synced = False  # the first full endpoint set has been applied

    def subscribe(self, on_added: EndpointCallback, on_removed: EndpointCallback) -> None:
        self._on_added.append(on_added)
        self._on_removed.append(on_removed)

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def get(self, key: str) -> Endpoint | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._snapshot)

    def replace_all(self, desired: Iterable[Endpoint]) -> None:
        """Make the set equal `desired`. Unchanged endpoints keep their object (and metrics);
        an endpoint whose name or labels changed is updated in place, and the tuple is new: its
        identity stands for the set and what filters read (labels), which readers cache on."""
        wanted = {ep.key: ep for ep in desired}
        changed = False
        for key in [k for k in self._by_key if k not in wanted]:
            self._remove(key)
            changed = True
        for key, ep in wanted.items():
            current = self._by_key.get(key)
            if current is None:
                self._add(ep)
                changed = True
            elif (current.name, current.labels, current.go_id) != (ep.name, ep.labels, ep.go_id):
                current.name, current.pod_name = ep.name, ep.pod_name
                current.labels = ep.labels
                current.go_id = ep.go_id  # a pod replaced at the same address and port
                changed = True
        if changed:  # the same tuple (and columns) otherwise: identity is what readers key on
            self._snapshot = tuple(self._by_key.values())
            self._columns = EndpointColumns(self._snapshot)
        self.synced = True

    def _add(self, ep: Endpoint) -> None:
        self._by_key[ep.key] = ep
        log.info("endpoint added: %s (%s)", ep.key, ep.name)
        for cb in self._on_added:
            cb(ep)

    def _remove(self, key: str) -> None:
        ep = self._by_key.pop(key)
        self._columns.detach(ep)
        log.info("endpoint removed: %s (%s)", ep.key, ep.name)
        for cb in self._on_removed:
            cb(ep)
