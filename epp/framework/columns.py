"""Scraped metrics as numpy columns: for scorers that score every candidate at once.

A pick at 1,000 endpoints spent most of its time in scorers looping over the candidates in
Python (`ep.metrics.waiting_queue_size` for each). The datastore keeps the values its scorers
read as columns instead, aligned with its endpoint tuple: rebuilt when the set of endpoints (or
an endpoint's name or labels) changes, updated one element when an endpoint's metrics snapshot
is replaced (assigning `ep.metrics` writes its row). `metric_columns(candidates)` hands a scorer
those columns:

- the datastore's own arrays when the candidates are its endpoint tuple (what the director passes
  when no filter narrowed it): no copy. They are read-only views; a plugin must not keep them
  past the pick (the next scrape writes them);
- a gather of the candidates' rows when they are a subset of it (after a filter); a subset given
  as a tuple (the profile hands scorers its filters' results as tuples) has its rows found once
  and kept with the columns (a few subsets: a profile's, another profile's), so a second scorer,
  or the next request through a filter that returns the same tuple, gathers without a pass
  over the endpoints;
- arrays built from each `ep.metrics` for endpoints in no datastore (tests, standalone use).

Each array is float64 (counts included, so the scorers' formulas give the same floats as Python's
int arithmetic did: counts are exact in a double).

    cols = metric_columns(endpoints)
    queue = cols.waiting_queue_size          # one value per candidate, in candidate order
    position = cols.position("10.0.0.1:8000")  # the candidate with this key, or None

`endpoint_positions(candidates)` is that key lookup alone (no arrays gathered). Up to
`SMALL_POOL_SIZE` candidates, plain lists are faster than numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from epp.framework.datamodel import Endpoint, EndpointMetrics
from epp.framework.tuples import PerTuple

Column = npt.NDArray[np.float64]

# Up to this many candidates, plain Python lists beat numpy (about 1 us a numpy call): the
# in-tree scorers and the profile's weighting use lists there, arrays above.
SMALL_POOL_SIZE = 16
# Subsets (tuples) whose rows the datastore's columns remember; the oldest is forgotten past it.
SUBSETS_KEPT = 8


class MetricColumns:
    """Scraped metrics aligned with `endpoints`: element i of each array is endpoint i's value.
    Read-only: never write into the arrays."""

    __slots__ = (
        "_positions",
        "endpoints",
        "kv_cache_usage",
        "running_requests",
        "updated_at",
        "waiting_queue_size",
    )

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        waiting_queue_size: Column,
        running_requests: Column,
        kv_cache_usage: Column,
        updated_at: Column,
    ) -> None:
        self.endpoints = endpoints
        self.waiting_queue_size = waiting_queue_size  # vllm:num_requests_waiting
        self.running_requests = running_requests  # vllm:num_requests_running
        self.kv_cache_usage = kv_cache_usage  # 0..1
        self.updated_at = updated_at  # time.monotonic() of the scrape; 0 = never scraped
        self._positions: dict[str, int] | None = None

    @classmethod
    def of(cls, endpoints: Sequence[Endpoint]) -> MetricColumns:
        """Columns built from each endpoint's current metrics snapshot (a copy)."""
        n = len(endpoints)
        snapshots = [ep.metrics for ep in endpoints]
        return cls(
            endpoints,
            np.fromiter((m.waiting_queue_size for m in snapshots), np.float64, n),
            np.fromiter((m.running_requests for m in snapshots), np.float64, n),
            np.fromiter((m.kv_cache_usage for m in snapshots), np.float64, n),
            np.fromiter((m.updated_at for m in snapshots), np.float64, n),
        )

    def __len__(self) -> int:
        return len(self.endpoints)

    def position(self, key: str) -> int | None:
        """The index of the endpoint with this key among `endpoints`, or None."""
        if self._positions is None:
            self._positions = {ep.key: i for i, ep in enumerate(self.endpoints)}
        return self._positions.get(key)


class EndpointColumns(MetricColumns):
    """The datastore's columns, aligned with its endpoint tuple. Each endpoint knows its row;
    assigning its `metrics` writes the row (`write`). An endpoint has a row in one column set at a
    time, the newest that took it: an Endpoint object belongs to one datastore."""

    __slots__ = ("_kv", "_running", "_subsets", "_updated", "_waiting")

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        n = len(endpoints)
        # A subset tuple's rows and key -> position map (None: not all of it is here).
        self._subsets: PerTuple[tuple[npt.NDArray[np.intp], dict[str, int]] | None] = PerTuple(SUBSETS_KEPT)
        self._waiting = np.zeros(n)
        self._running = np.zeros(n)
        self._kv = np.zeros(n)
        self._updated = np.zeros(n)
        super().__init__(
            endpoints,
            _read_only(self._waiting),
            _read_only(self._running),
            _read_only(self._kv),
            _read_only(self._updated),
        )
        self._positions = {}
        for slot, ep in enumerate(endpoints):
            ep._column_set, ep._column_slot = self, slot
            self._positions[ep.key] = slot
            self.write(slot, ep.metrics)

    def write(self, slot: int, metrics: EndpointMetrics) -> None:
        self._waiting[slot] = metrics.waiting_queue_size
        self._running[slot] = metrics.running_requests
        self._kv[slot] = metrics.kv_cache_usage
        self._updated[slot] = metrics.updated_at

    def subset(self, endpoints: tuple[Endpoint, ...]) -> tuple[npt.NDArray[np.intp], dict[str, int]] | None:
        """The rows of a tuple of this datastore's endpoints and its key -> position map, found
        once per tuple (None when one of them is not among these columns' endpoints)."""
        return self._subsets.get(endpoints, self._find_subset)

    def _find_subset(
        self, endpoints: tuple[Endpoint, ...]
    ) -> tuple[npt.NDArray[np.intp], dict[str, int]] | None:
        rows = self.rows_of(endpoints)
        return None if rows is None else (rows, {ep.key: i for i, ep in enumerate(endpoints)})

    def rows_of(self, endpoints: Sequence[Endpoint]) -> npt.NDArray[np.intp] | None:
        """Each endpoint's row of these columns (None when one of them has none here)."""
        rows = [ep._column_slot if ep._column_set is self else -1 for ep in endpoints]
        return None if -1 in rows else np.array(rows, dtype=np.intp)

    def detach(self, ep: Endpoint) -> None:
        """`ep` left the datastore: its metrics no longer go into these columns."""
        if ep._column_set is self:
            ep._column_set = None


def _read_only(array: Column) -> Column:
    view = array.view()
    view.flags.writeable = False
    return view


_EMPTY = _read_only(np.zeros(0))


def metric_columns(endpoints: Sequence[Endpoint]) -> MetricColumns:
    """Scraped metrics of `endpoints` as float64 arrays in their order (see the module docstring):
    the datastore's columns themselves when `endpoints` is its endpoint tuple, else a gather of
    their rows, else built from each `ep.metrics`."""
    if not endpoints:
        return MetricColumns(endpoints, _EMPTY, _EMPTY, _EMPTY, _EMPTY)
    owner = endpoints[0]._column_set
    if owner is not None:
        if endpoints is owner.endpoints:
            return owner
        positions: dict[str, int] | None = None
        if isinstance(endpoints, tuple):
            found = owner.subset(endpoints)
            index = None if found is None else found[0]
            positions = None if found is None else found[1]
        else:
            index = owner.rows_of(endpoints)
        if index is not None:
            columns = MetricColumns(
                endpoints,
                owner.waiting_queue_size[index],
                owner.running_requests[index],
                owner.kv_cache_usage[index],
                owner.updated_at[index],
            )
            columns._positions = positions
            return columns
    return MetricColumns.of(endpoints)


def endpoint_positions(endpoints: Sequence[Endpoint]) -> Callable[[str], int | None]:
    """key -> the index of the endpoint with that key in `endpoints` (None: not there): the
    datastore's own map when `endpoints` is its endpoint tuple, the map the columns remember for
    a tuple subset of it, else one built here."""
    if endpoints:
        owner = endpoints[0]._column_set
        if owner is not None and endpoints is owner.endpoints:
            return owner.position
        if owner is not None and isinstance(endpoints, tuple):
            found = owner.subset(endpoints)
            if found is not None:
                return found[1].get
    return {ep.key: i for i, ep in enumerate(endpoints)}.get
