"""Metric columns: the datastore's scraped metrics as numpy arrays aligned with its endpoints,
kept current by every assignment of `ep.metrics`, and what `metric_columns` hands a scorer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from epp.datalayer.datastore import Datastore
from epp.framework import Endpoint, EndpointMetrics, endpoint_positions, metric_columns
from epp.testing import make_endpoint


def pool(n: int) -> list[Endpoint]:
    return [
        make_endpoint(f"e{i}", waiting=i, running=2 * i, kv=i / 10, updated_at=100.0 + i) for i in range(n)
    ]


def store_of(endpoints: list[Endpoint]) -> Datastore:
    store = Datastore()
    store.replace_all(endpoints)
    return store


def values(cols: object) -> list[list[float]]:
    return [
        getattr(cols, name).tolist()
        for name in ("waiting_queue_size", "running_requests", "kv_cache_usage", "updated_at")
    ]


def test_the_datastore_tuple_gets_the_columns_themselves_read_only() -> None:
    store = store_of(pool(4))
    cols = metric_columns(store.endpoints())
    assert metric_columns(store.endpoints()) is cols  # no copy per call
    assert values(cols) == [[0, 1, 2, 3], [0, 2, 4, 6], [0, 0.1, 0.2, 0.3], [100, 101, 102, 103]]
    with pytest.raises(ValueError, match="read-only"):
        cols.waiting_queue_size[0] = 7.0


def test_assigning_metrics_writes_the_endpoints_row() -> None:
    store = store_of(pool(3))
    cols = metric_columns(store.endpoints())
    ep = store.endpoints()[1]
    ep.metrics = dataclasses.replace(ep.metrics, waiting_queue_size=9, kv_cache_usage=0.95, updated_at=500.0)
    assert cols.waiting_queue_size.tolist() == [0, 9, 2]
    assert cols.kv_cache_usage.tolist() == [0, 0.95, 0.2]
    assert cols.updated_at.tolist() == [100, 500, 102]


def test_columns_follow_the_endpoint_set_and_a_removed_endpoint_writes_nothing() -> None:
    a, b, c = pool(3)
    store = store_of([a, b, c])
    before = metric_columns(store.endpoints())
    store.replace_all([a, c])  # b leaves
    after = metric_columns(store.endpoints())
    assert after is not before and after.waiting_queue_size.tolist() == [0, 2]
    b.metrics = EndpointMetrics(waiting_queue_size=50)  # no longer in the datastore
    c.metrics = EndpointMetrics(waiting_queue_size=40)
    assert after.waiting_queue_size.tolist() == [0, 40]
    store.replace_all([a, c])  # the same set: the same tuple and columns
    assert metric_columns(store.endpoints()) is after


def test_a_subset_is_gathered_in_its_own_order() -> None:
    store = store_of(pool(5))
    e = store.endpoints()
    subset = [e[4], e[1], e[3]]
    cols = metric_columns(subset)
    assert values(cols) == [[4, 1, 3], [8, 2, 6], [0.4, 0.1, 0.3], [104, 101, 103]]
    assert cols.position(e[1].key) == 1 and cols.position(e[0].key) is None
    e[1].metrics = EndpointMetrics(waiting_queue_size=70)
    assert cols.waiting_queue_size.tolist() == [4, 1, 3]  # a copy, taken at the call
    assert metric_columns(subset).waiting_queue_size.tolist() == [4, 70, 3]


def test_endpoints_in_no_datastore_and_mixed_sets_read_their_metrics() -> None:
    loose = pool(3)
    assert values(metric_columns(loose)) == [[0, 1, 2], [0, 2, 4], [0, 0.1, 0.2], [100, 101, 102]]
    store = store_of(pool(2))
    mixed = [store.endpoints()[1], make_endpoint("x", waiting=33)]
    assert metric_columns(mixed).waiting_queue_size.tolist() == [1, 33]
    empty = metric_columns([])
    assert len(empty) == 0 and empty.kv_cache_usage.dtype == np.float64


def test_endpoint_positions() -> None:
    store = store_of(pool(3))
    e = store.endpoints()
    assert endpoint_positions(e)(e[2].key) == 2
    assert endpoint_positions([e[2], e[0]])(e[0].key) == 1
    assert endpoint_positions([e[2]])(e[0].key) is None
    assert endpoint_positions([])("anything") is None


@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_subset_tuple_has_its_rows_found_once_and_its_values_read_fresh(as_tuple: bool) -> None:
    """A tuple (what the profile hands scorers after a filter) is a subset the columns remember:
    its rows and positions are not looked up again, yet each call gathers the current values;
    a list is looked up each time. Only a few subsets are remembered."""
    from epp.framework import columns

    store = store_of(pool(5))
    e = store.endpoints()
    subset = (e[4], e[1], e[3]) if as_tuple else [e[4], e[1], e[3]]
    first = metric_columns(subset)
    e[1].metrics = EndpointMetrics(waiting_queue_size=70)
    again = metric_columns(subset)
    assert first.waiting_queue_size.tolist() == [4, 1, 3] and again.waiting_queue_size.tolist() == [4, 70, 3]
    assert again.position(e[1].key) == 1 and endpoint_positions(subset)(e[3].key) == 2
    owner = e[0]._column_set
    assert owner is not None
    remembered = owner._subsets
    assert (len(remembered) == 1) is as_tuple
    for i in range(columns.SUBSETS_KEPT + 3):  # others come and go: the store stays bounded
        metric_columns((e[i % 5], e[(i + 1) % 5]))
    assert len(remembered) <= columns.SUBSETS_KEPT
    store.replace_all([*e, make_endpoint("new")])  # a new tuple, new columns: nothing carried over
    assert metric_columns(subset).waiting_queue_size.tolist() == [4, 70, 3]


def test_a_snapshot_stamped_again_has_every_value_and_the_new_time_in_its_columns() -> None:
    """`EndpointMetrics.stamped` (an idle server's repeated page) copies slot by slot: every field,
    whatever it holds, as `dataclasses.replace` would, and the columns see the new time."""
    full = EndpointMetrics(3, 4, 0.5, frozenset({"a"}), frozenset({"b"}), 2, 16, 4096, 7.0)
    # Every field holds a value unlike its default (a field `stamped` forgot would show).
    assert all(getattr(full, f.name) != f.default for f in dataclasses.fields(EndpointMetrics))
    again = full.stamped(9.0)
    assert again == dataclasses.replace(full, updated_at=9.0) and again is not full
    assert full.updated_at == 7.0  # the snapshot itself is never changed
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.updated_at = 1.0  # type: ignore[misc]
    ep = make_endpoint("e0")
    store_of([ep])
    ep.metrics = again
    assert metric_columns((ep,)).updated_at.tolist() == [9.0]


def test_per_tuple_keeps_a_value_per_tuple_identity_for_the_last_few() -> None:
    """`PerTuple` makes a value once per tuple object (an equal but other tuple is another key)
    and keeps the last `size`, the oldest forgotten first."""
    from epp.framework import PerTuple

    made: list[tuple[Endpoint, ...]] = []

    def make(endpoints: tuple[Endpoint, ...]) -> int:
        made.append(endpoints)
        return len(made)

    kept: PerTuple[int] = PerTuple(2)
    a, b = tuple(pool(2)), tuple(pool(3))
    twin = (*a,)
    assert twin == a and twin is not a
    assert [kept.get(a, make), kept.get(a, make), kept.get(twin, make)] == [1, 1, 2]
    assert kept.get(b, make) == 3 and len(kept) == 2  # `a` was the oldest: forgotten
    assert kept.get(a, make) == 4 and kept.get(b, make) == 3
