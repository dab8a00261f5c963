"""Events from a publisher with vLLM's sockets and protocol reach the index: both topologies,
lost batches replayed, a restarted engine's blocks cleared, AllBlocksCleared honoured."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from epp_scorers.kvcache import consumer as consumer_module
from epp_scorers.kvcache import index as index_module
from epp_scorers.kvcache.consumer import WARN_BURST, EventConsumer
from epp_scorers.kvcache.index import MemoryBlockIndex
from epp_scorers.kvcache.keys import block_hashes, key_of
from epp_scorers.kvcache.subscriber import MAX_MESSAGE_BYTES, bound_subscriber, connected_subscriber
from epp_scorers.kvcache.wire import MAX_TOPIC_BYTES, Message, decode_batch
from tests.plugins.kvcache import vllm_events as v

TOKENS = list(range(64))
HASHES = block_hashes(TOKENS, hash_seed="0")
KEYS = [key_of(h) for h in HASHES]
POD = {"pod": ["10.0.0.1", "10.0.0.1:8000"]}


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _publish_until_seen(pub: v.Publisher, consumer: EventConsumer, payload: bytes) -> None:
    """PUB/SUB drops what is sent before the subscription is up (ZMQ's slow joiner): send
    until the first batch is applied, as an engine's steady stream would."""
    async with asyncio.timeout(5):
        while consumer.stats.batches == 0:
            await pub.publish(payload)
            await asyncio.sleep(0.05)


async def test_engines_connect_to_the_socket_epp_binds() -> None:
    index = MemoryBlockIndex()
    consumer = EventConsumer(index)
    bound: list[str] = []
    async with _running(bound_subscriber("tcp://127.0.0.1:*", "kv@", consumer, on_bound=bound.append)):
        await _until(lambda: bool(bound))
        pub = v.Publisher(bound[0], "kv@10.0.0.1@model")
        ignored = v.Publisher(bound[0], "other-topic")  # filtered out by the topic prefix
        try:
            await ignored.publish(v.encode([v.stored(HASHES, TOKENS)]))
            await _publish_until_seen(pub, consumer, v.encode([v.stored(HASHES[:2], TOKENS[:32])]))
            assert index.match(KEYS, POD) == {"pod": 2}
            await pub.publish(v.encode([v.stored(HASHES[2:], TOKENS[32:], parent=HASHES[1])]))
            await _until(lambda: index.match(KEYS, POD) == {"pod": 4})
            await pub.publish(v.encode([v.BlockRemoved([HASHES[1]], "GPU")]))
            await _until(lambda: index.match(KEYS, POD) == {"pod": 1})
        finally:
            await pub.close()
            await ignored.close()


async def test_epp_connects_to_each_engine_and_replays_what_it_missed() -> None:
    index = MemoryBlockIndex()
    consumer = EventConsumer(index)
    pub = v.Publisher("tcp://127.0.0.1:*", "kv@10.0.0.1@model", replay_endpoint="tcp://127.0.0.1:*")
    try:
        async with _running(
            connected_subscriber(pub.endpoint, "10.0.0.1:8000", "kv@", consumer, pub.replay_endpoint)
        ):
            await _publish_until_seen(pub, consumer, v.encode([v.stored(HASHES[:1], TOKENS[:16])]))
            # Two batches lost on the way (a full socket, a reconnect): the next one shows the gap.
            await pub.publish(v.encode([v.stored(HASHES[1:2], TOKENS[16:32], HASHES[0])]), drop=True)
            await pub.publish(v.encode([v.stored(HASHES[2:3], TOKENS[32:48], HASHES[1])]), drop=True)
            await pub.publish(v.encode([v.stored(HASHES[3:], TOKENS[48:], HASHES[2])]))
            await _until(lambda: index.match(KEYS, POD) == {"pod": 4})
            assert consumer.stats.gaps == 1 and consumer.stats.replayed == 2
            assert consumer.stats.lost_batches == 0
    finally:
        await pub.close()


async def test_a_gap_without_replay_is_counted_and_the_stream_goes_on() -> None:
    index = MemoryBlockIndex()
    consumer = EventConsumer(index)
    pub = v.Publisher("tcp://127.0.0.1:*", "kv@10.0.0.1@model")
    try:
        async with _running(connected_subscriber(pub.endpoint, "10.0.0.1", "kv@", consumer)):
            await _publish_until_seen(pub, consumer, v.encode([v.stored(HASHES[:1], TOKENS[:16])]))
            await pub.publish(v.encode([v.stored(HASHES[1:2], TOKENS[16:32], HASHES[0])]), drop=True)
            await pub.publish(v.encode([v.stored(HASHES[2:], TOKENS[32:], HASHES[1])]))
            await _until(lambda: consumer.stats.lost_batches == 1)
            assert index.match(KEYS, POD) == {"pod": 1}  # block 2 never arrived: the match stops there
    finally:
        await pub.close()


async def test_a_restarted_engine_and_all_blocks_cleared_empty_the_pod() -> None:
    index = MemoryBlockIndex()
    consumer = EventConsumer(index)
    pub = v.Publisher("tcp://127.0.0.1:*", "kv@10.0.0.1@model")
    try:
        async with _running(connected_subscriber(pub.endpoint, "10.0.0.1", "kv@", consumer)):
            await _publish_until_seen(pub, consumer, v.encode([v.stored(HASHES, TOKENS)]))
            await pub.publish(v.encode([v.stored(HASHES, TOKENS)]))
            await _until(lambda: consumer.stats.batches >= 2)
            pub.restart()  # a new engine process: sequence 0 again, its cache empty
            await pub.publish(v.encode([v.stored(HASHES[:1], TOKENS[:16])]))
            await _until(lambda: consumer.stats.restarts == 1)
            assert index.match(KEYS, POD) == {"pod": 1}
            await pub.publish(v.encode([v.AllBlocksCleared()]))
            await _until(lambda: consumer.stats.clears == 1)
            assert index.match(KEYS, POD) == {}
    finally:
        await pub.close()


@pytest.mark.parametrize("frames", [[b"kv@x@m", b"\0"], [b"kv@x@m", b"\0" * 8, b"\xc1"]])
async def test_malformed_messages_are_counted_and_dropped(frames: list[bytes]) -> None:
    consumer = EventConsumer(MemoryBlockIndex())
    pub = v.Publisher("tcp://127.0.0.1:*", "kv@10.0.0.1@model")
    try:
        async with _running(connected_subscriber(pub.endpoint, "10.0.0.1", "kv@", consumer)):
            async with asyncio.timeout(5):
                while consumer.stats.malformed == 0:
                    await pub.pub.send_multipart(frames)
                    await asyncio.sleep(0.05)
            assert consumer.stats.batches == 0
    finally:
        await pub.close()


async def test_a_topic_too_long_or_a_message_too_large_is_never_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any peer that reaches a bound socket can send: a topic past MAX_TOPIC_BYTES is dropped as
    malformed (its warnings rate-limited), and a message past MAX_MESSAGE_BYTES is refused by ZMQ
    itself before it is held; a good message from the same publisher still lands."""
    consumer = EventConsumer(MemoryBlockIndex())
    bound: list[str] = []
    async with _running(bound_subscriber("tcp://127.0.0.1:*", "kv@", consumer, on_bound=bound.append)):
        await _until(lambda: bool(bound))
        long_topic = "kv@" + "p" * MAX_TOPIC_BYTES + "@model"
        pub = v.Publisher(bound[0], long_topic)
        try:
            async with asyncio.timeout(5):
                while consumer.stats.malformed < 30:
                    await pub.publish(v.encode([v.stored(HASHES, TOKENS)]))
                    await asyncio.sleep(0.005)
        finally:
            await pub.close()
        assert consumer.stats.batches == 0
        warned = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
        assert 1 <= len(warned) <= WARN_BURST
        malformed = consumer.stats.malformed
        huge = v.Publisher(bound[0], "kv@10.0.0.9@model")
        small = v.Publisher(bound[0], "kv@10.0.0.1@model")
        try:
            await _publish_until_seen(small, consumer, v.encode([v.stored(HASHES[:1], TOKENS[:16])]))
            for _ in range(3):  # not msgpack: were it received, it would count as malformed
                await huge.publish(b"\xc1" * (MAX_MESSAGE_BYTES + 1))
            await small.publish(v.encode([v.stored(HASHES[1:2], TOKENS[16:32], parent=HASHES[0])]))
            await _until(lambda: consumer.stats.batches >= 2)
            await asyncio.sleep(0.3)
        finally:
            await huge.close()
            await small.close()
        assert consumer.stats.malformed == malformed  # ZMQ dropped the huge ones unread


async def test_what_is_kept_per_source_and_per_pod_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sources (a topic, an engine) and pods come and go: the sequences of the least recently heard
    sources and the generations of the first pods named are forgotten past their bounds."""
    monkeypatch.setattr(consumer_module, "MAX_SOURCES", 3)
    monkeypatch.setattr(index_module, "MAX_PODS", 3)
    index = MemoryBlockIndex()
    consumer = EventConsumer(index)
    payload = v.encode([v.stored(HASHES[:1], TOKENS[:16])])
    for i in range(5):
        await consumer.handle(f"kv@10.0.0.{i}@m", f"10.0.0.{i}", Message(f"kv@10.0.0.{i}@m", 1, payload))
    await consumer.handle("kv@10.0.0.2@m", "10.0.0.2", Message("kv@10.0.0.2@m", 2, payload))
    assert list(consumer.stats.sources) == ["kv@10.0.0.3@m", "kv@10.0.0.4@m", "kv@10.0.0.2@m"]
    held = {f"p{i}": [f"10.0.0.{i}"] for i in range(5)}
    assert index.match(KEYS[:1], held) == {"p2": 1, "p3": 1, "p4": 1}  # 0 and 1 forgotten


async def _stalling_replay(batches: int, payload: bytes | None = None) -> tuple[str, asyncio.Task[None]]:
    """A replay socket that answers `batches` batches from the asked start, then goes silent."""
    import zmq

    from epp_scorers.kvcache.subscriber import zmq_context

    sock = zmq_context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve() -> None:
        try:
            while True:  # every request: the same partial answer
                identity, _, start = await sock.recv_multipart()
                first = int.from_bytes(start, "big")
                for seq in range(first, first + batches):
                    body = v.encode([]) if payload is None else payload
                    await sock.send_multipart([identity, b"", seq.to_bytes(8, "big"), body])
        finally:
            sock.close(linger=0)

    return endpoint, asyncio.ensure_future(serve())


@pytest.mark.parametrize("batches", [2, 0])
async def test_a_replay_that_stalls_keeps_what_came_in_time(batches: int, monkeypatch: Any) -> None:
    """An engine whose replay socket answers part of a gap and then nothing: what came within the
    timeout is applied, the rest counted lost, and a replay with nothing at all is a failed one."""
    from epp_scorers.kvcache import subscriber

    monkeypatch.setattr(subscriber, "REPLAY_TIMEOUT_S", 0.3)
    endpoint, server = await _stalling_replay(batches)
    try:
        replay = subscriber.replay_from(endpoint)
        if batches:
            assert [seq for seq, _ in await replay(5)] == [5, 6]
        else:
            with pytest.raises(TimeoutError):
                await replay(5)
        consumer = EventConsumer(MemoryBlockIndex())
        await consumer._fill_gap("src", "10.0.0.1", 5, 9, replay)  # batches 5..8 missing
        assert (consumer.stats.replayed, consumer.stats.lost_batches) == (batches, 4 - batches)
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def test_a_replay_holds_a_bounded_number_of_bytes(monkeypatch: Any) -> None:
    """A replay socket (in bound mode, any host a topic names) cannot make epp hold more than
    REPLAY_MAX_BYTES before it applies the batches."""
    from epp_scorers.kvcache import subscriber

    monkeypatch.setattr(subscriber, "REPLAY_MAX_BYTES", 3_000)
    endpoint, server = await _stalling_replay(100, payload=b"x" * 1_000)
    try:
        got = await subscriber.replay_from(endpoint)(0)
        assert [seq for seq, _ in got] == [0, 1, 2]
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def test_adapter_names_are_bounded_and_the_recent_ones_kept(monkeypatch: Any) -> None:
    """Names from BlockStored events: too long ones are not kept, and once the table is full the
    least recently seen go, so an adapter loaded later still gets its LoRA keys."""
    monkeypatch.setattr(consumer_module, "MAX_LORA_NAMES", 3)
    consumer = EventConsumer(MemoryBlockIndex())

    def store(lora: str) -> None:
        event = v.BlockStored(HASHES[:1], None, TOKENS[:16], 16, 1, "GPU", lora)
        consumer.apply("10.0.0.1", decode_batch(v.encode([event])))

    store("x" * 2_000)
    for name in ("a", "b", "c", "a", "d"):
        store(name)
    assert list(consumer.lora_names) == ["c", "a", "d"]


@pytest.mark.parametrize("in_pool", [True, False])
async def test_a_bound_socket_replays_a_gap_only_from_a_pod_of_the_pool(in_pool: bool) -> None:
    """Any peer can publish to the socket epp binds, naming any host in its topic: epp asks a
    replay only of a pod in the pool, and otherwise counts the gap as lost."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        replay_port = probe.getsockname()[1]
    index = MemoryBlockIndex()
    consumer = EventConsumer(index)
    asked: list[str] = []

    def allowed(pod: str) -> bool:
        asked.append(pod)
        return in_pool

    bound: list[str] = []
    subscriber = bound_subscriber(
        "tcp://127.0.0.1:*", "kv@", consumer, replay_port, on_bound=bound.append, replay_allowed=allowed
    )
    async with _running(subscriber):
        await _until(lambda: bool(bound))
        pub = v.Publisher(bound[0], "kv@127.0.0.1@model", replay_endpoint=f"tcp://127.0.0.1:{replay_port}")
        try:
            await _publish_until_seen(pub, consumer, v.encode([v.stored(HASHES[:1], TOKENS[:16])]))
            await pub.publish(v.encode([v.stored(HASHES[1:2], TOKENS[16:32], HASHES[0])]), drop=True)
            await pub.publish(v.encode([v.stored(HASHES[2:], TOKENS[32:], HASHES[1])]))
            await _until(lambda: consumer.stats.gaps == 1 and consumer.stats.batches >= 3 - (not in_pool))
            assert asked == ["127.0.0.1"]
            assert (consumer.stats.replayed, consumer.stats.lost_batches) == ((1, 0) if in_pool else (0, 1))
        finally:
            await pub.close()
