"""The datastore: the endpoint set discovery writes and the director reads."""

from __future__ import annotations

from epp.datalayer.datastore import Datastore
from epp.framework import Endpoint


def test_replace_all_keeps_unchanged_endpoints_and_tells_subscribers() -> None:
    store = Datastore()
    added: list[str] = []
    removed: list[str] = []
    store.subscribe(lambda ep: added.append(ep.key), lambda ep: removed.append(ep.key))
    assert not store.synced and store.endpoints() == ()

    store.replace_all([Endpoint("10.0.0.1", 8000, "a"), Endpoint("10.0.0.2", 8000, "b")])
    assert store.synced and len(store) == 2 and added == ["10.0.0.1:8000", "10.0.0.2:8000"]
    a = store.get("10.0.0.1:8000")
    assert a is not None
    a.inflight_requests = 3  # state that must survive a resync

    store.replace_all([Endpoint("10.0.0.1", 8000, "a-renamed", {"tier": "gold"}), Endpoint("10.0.0.3", 8000)])
    assert removed == ["10.0.0.2:8000"] and added[-1] == "10.0.0.3:8000"
    same = store.get("10.0.0.1:8000")
    assert same is a and same.name == "a-renamed" and same.labels == {"tier": "gold"}
    assert same.inflight_requests == 3
    assert [ep.key for ep in store.endpoints()] == ["10.0.0.1:8000", "10.0.0.3:8000"]


def test_readers_get_one_snapshot_until_the_set_changes() -> None:
    store = Datastore()
    store.replace_all([Endpoint("h", 1)])
    first = store.endpoints()
    assert store.endpoints() is first  # no copy per read
    store.replace_all([Endpoint("h", 1), Endpoint("h", 2)])
    assert store.endpoints() is not first and len(first) == 1


def test_ipv6_endpoints_are_keyed_in_brackets() -> None:
    store = Datastore()
    store.replace_all([Endpoint("fd00::1", 8000)])
    assert store.get("[fd00::1]:8000") is not None


def test_a_relabelled_endpoint_makes_a_new_tuple_that_keeps_every_endpoint_object() -> None:
    """Readers (label filters, the metric columns' subsets) key what they derive on the tuple's
    identity: a label or name change must give a new tuple; the endpoints stay the same objects."""
    store = Datastore()
    store.replace_all(
        [Endpoint("10.0.0.1", 8000, "a", {"llm-d.ai/role": "decode"}), Endpoint("10.0.0.2", 8000)]
    )
    first = store.endpoints()
    store.replace_all(
        [Endpoint("10.0.0.1", 8000, "a", {"llm-d.ai/role": "prefill"}), Endpoint("10.0.0.2", 8000)]
    )
    second = store.endpoints()
    assert second is not first and all(x is y for x, y in zip(first, second, strict=True))
    assert second[0].labels == {"llm-d.ai/role": "prefill"}
    store.replace_all(
        [Endpoint("10.0.0.1", 8000, "a", {"llm-d.ai/role": "prefill"}), Endpoint("10.0.0.2", 8000)]
    )
    assert store.endpoints() is second  # nothing changed: the same tuple
