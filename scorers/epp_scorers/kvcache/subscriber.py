"""ZMQ SUB sockets receiving vLLM's KV events, and the DEALER side of vLLM's replay protocol.

Two topologies, as upstream supports them (docs/kv-events.md#topologies):

- `bound_subscriber`: epp binds one SUB socket (`kvEventsConfig.zmqEndpoint`, e.g.
  `tcp://*:5557`) and every engine's PUB socket connects to it; the pod is read from each
  message's topic (`kv@<pod>@<model>`).
- `connected_subscriber`: epp connects one SUB socket to each pod it discovers
  (`tcp://<pod-ip>:<socketPort>`, the engine binding `tcp://*:<port>`); the pod is the endpoint.

Each receives, decodes and applies batch after batch in one task (no queue of its own): while
epp is busy the engine's messages wait in the socket, bounded by its receive high-water mark
(`RCV_HWM` messages); past it ZMQ drops them, the sequence numbers show the gap and the consumer
asks for a replay. A socket error ends the coroutine with an exception: the supervisor starts it
again after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from epp_scorers.kvcache.consumer import EventConsumer, Replay
from epp_scorers.kvcache.wire import END_SEQ, WireError, parse_frames, parse_topic

# pyzmq is imported when a subscriber starts (see epp_scorers.kvcache.tokenize on why).
if TYPE_CHECKING:
    import zmq.asyncio

log = logging.getLogger(__name__)

RCV_HWM: Final = 10_000  # messages waiting in one SUB socket before ZMQ drops (a gap, then replay)
# A peer sending a larger message is disconnected (a vLLM batch is kilobytes; a 128k-token prompt's
# blocks, a few hundred kB).
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
REPLAY_TIMEOUT_S: Final = 2.0
REPLAY_MAX_BATCHES: Final = 10_000  # vLLM's default buffer_steps: more is not coming
REPLAY_MAX_BYTES: Final = 64 * 1024 * 1024  # what one replay may hold before it is applied

_context: zmq.asyncio.Context | None = None


def zmq_context() -> zmq.asyncio.Context:
    global _context
    if _context is None:
        import zmq.asyncio

        _context = zmq.asyncio.Context()
    return _context


def _sub_socket(topic_filter: str) -> zmq.asyncio.Socket:
    import zmq

    sock = zmq_context().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, RCV_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, topic_filter.encode())
    return sock


def replay_from(endpoint: str) -> Replay:
    """vLLM's replay protocol against the ROUTER socket at `endpoint`: send ["", start (8 bytes
    big-endian)], read ["", seq, payload] until the end marker ["", -1, ""]."""

    async def replay(start: int) -> list[tuple[int, bytes]]:
        import zmq

        sock = zmq_context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a larger answer: the peer is dropped
        try:
            sock.connect(endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            got: list[tuple[int, bytes]] = []
            held = 0
            try:
                async with asyncio.timeout(REPLAY_TIMEOUT_S):
                    while len(got) < REPLAY_MAX_BATCHES and held < REPLAY_MAX_BYTES:
                        frames = await sock.recv_multipart()
                        if len(frames) != 3 or frames[1] == END_SEQ:
                            break
                        got.append((int.from_bytes(frames[1], "big"), frames[2]))
                        held += len(frames[2])
            except TimeoutError:
                if not got:
                    raise
                # What came in time is applied (in order); the rest of the gap is counted lost.
            return got
        finally:
            sock.close(linger=0)

    return replay


async def bound_subscriber(
    endpoint: str,
    topic_filter: str,
    consumer: EventConsumer,
    replay_port: int = 0,
    on_bound: Callable[[str], None] | None = None,
    replay_allowed: Callable[[str], bool] | None = None,
) -> None:
    """Bind a SUB socket at `endpoint` and apply what every connecting engine publishes. A gap is
    replayed from the host the topic names only if `replay_allowed(pod)` (any peer can publish
    to a bound socket: epp does not connect wherever a topic tells it to)."""
    import zmq

    sock = _sub_socket(topic_filter)
    try:
        sock.bind(endpoint)
        bound = sock.getsockopt(zmq.LAST_ENDPOINT)
        log.info("KV events: SUB socket bound at %s", bound.decode() if isinstance(bound, bytes) else bound)
        if on_bound is not None:
            on_bound(bound.decode() if isinstance(bound, bytes) else str(bound))
        while True:
            frames = await sock.recv_multipart()
            try:
                message = parse_frames(frames)
            except WireError as exc:
                consumer.malformed("KV events at %s: dropped a malformed message: %s", endpoint, exc)
                continue
            pod, _model = parse_topic(message.topic)
            if not pod:
                consumer.malformed(
                    "KV events at %s: topic %r names no pod (kv@<pod>@<model>)", endpoint, message.topic
                )
                continue
            replay = _replay_for(pod, replay_port, replay_allowed) if replay_port else None
            await consumer.handle(message.topic, pod, message, replay)
    finally:
        sock.close(linger=0)


async def connected_subscriber(
    endpoint: str,
    pod: str,
    topic_filter: str,
    consumer: EventConsumer,
    replay_endpoint: str | None = None,
) -> None:
    """Connect a SUB socket to one engine's PUB socket at `endpoint`; its events are `pod`'s."""
    import zmq

    sock = _sub_socket(topic_filter)
    replay = replay_from(replay_endpoint) if replay_endpoint else None
    try:
        sock.connect(endpoint)
        log.info("KV events: subscribed to %s for %s", endpoint, pod)
        while True:
            frames = await sock.recv_multipart()
            try:
                message = parse_frames(frames)
            except WireError as exc:
                consumer.malformed("KV events from %s: dropped a malformed message: %s", endpoint, exc)
                continue
            await consumer.handle(endpoint, pod, message, replay)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.close(linger=0)


def _replay_for(pod: str, port: int, allowed: Callable[[str], bool] | None) -> Replay:
    fetch = replay_from(f"tcp://{_host(pod)}:{port}")
    if allowed is None:
        return fetch

    async def guarded(start: int) -> Sequence[tuple[int, bytes]]:
        if not allowed(pod):  # asked only on a gap
            raise OSError(f"{pod} is not an endpoint of the pool: no replay asked of it")
        return await fetch(start)

    return guarded


def pod_host(pod: str) -> str:
    """The address a pod name holds, without brackets or port ("[fd00::1]:80" -> "fd00::1")."""
    return _host(pod).strip("[]")


def _host(pod: str) -> str:
    """The host of a pod name: "10.0.0.1" or "10.0.0.1:8000" -> "10.0.0.1"; "[fd00::1]:80" -> "[fd00::1]"."""
    if pod.startswith("["):
        return pod.split("]", 1)[0] + "]"
    if pod.count(":") == 1:
        return pod.split(":", 1)[0]
    return f"[{pod}]" if ":" in pod else pod
