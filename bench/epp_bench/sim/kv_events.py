"""KV-cache events in vLLM's wire format, published over ZMQ as vLLM's `ZmqEventPublisher` does.

Configuration is vLLM's `--kv-events-config` JSON (`KVEventsConfig`): `enable_kv_cache_events`,
`publisher` ("zmq" or "null"), `endpoint` (default `tcp://*:5557`), `replay_endpoint`,
`buffer_steps` (batches kept for replay, 10,000), `hwm` (the PUB socket's high-water mark, 100,000),
`topic` (""). Unknown keys are refused.

Wire format (one message per engine step that changed the cache):

- a PUB multipart message `[topic, sequence, payload]`: the sequence an 8-byte big-endian counter
  from 0, the payload a msgpack `KVEventBatch`: the array `[ts, events, data_parallel_rank]`;
- each event a msgpack map tagged by its class name under `type` (msgspec's tagged structs):
  `BlockStored {block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, group_idx, kv_cache_spec_kind}`, `BlockRemoved {block_hashes, medium, group_idx}`,
  `AllBlocksCleared {}`. Fields with defaults are left out when they hold them (omit_defaults),
  as vLLM's encoder does. The older layout, where each event is an array `[tag, field, ...]`
  (vLLM's `array_like` events, still what some consumers expect), is `layout="array"`.

The PUB socket binds when the endpoint has `*` or `::` or is `ipc://` / `inproc://`, and connects
otherwise (vLLM's rule: a router that binds one address for every pod, or pods that bind and a
router that subscribes to each). `tcp://127.0.0.1:*` binds a free loopback port; `endpoint` then
names it. The replay ROUTER socket (bound when `replay_endpoint` is set) answers a request
`[b"", start_sequence (8 bytes, big-endian)]` with `[b"", sequence, payload]` for every buffered
batch from that sequence on, then `[b"", -1 (8 bytes, signed), b""]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

MEDIUM_GPU: Final = "GPU"
END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)
LAYOUTS: Final = ("map", "array")

ExternalHash = bytes | int


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[ExternalHash]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def _event_fields(event: KVEvent) -> list[tuple[str, Any]]:
    """(name, value) in vLLM's declaration order; `group_idx` is the single KV cache group, 0."""
    if isinstance(event, BlockStored):
        return [
            ("block_hashes", event.block_hashes),
            ("parent_block_hash", event.parent_block_hash),
            ("token_ids", event.token_ids),
            ("block_size", event.block_size),
            ("lora_id", event.lora_id),
            ("medium", event.medium),
            ("lora_name", event.lora_name),
            ("group_idx", 0),
            # Current vLLM describes the group's KV cache spec on store events; the simulator's one
            # group is full attention (no sliding window, so that field keeps its default, omitted).
            ("kv_cache_spec_kind", "full_attention"),
        ]
    if isinstance(event, BlockRemoved):
        return [("block_hashes", event.block_hashes), ("medium", event.medium), ("group_idx", 0)]
    return []


def encode_event(event: KVEvent, layout: str = "map") -> Any:
    tag = type(event).__name__
    fields = _event_fields(event)
    if layout == "array":
        return [tag, *(value for _, value in fields)]
    return {"type": tag, **dict(fields)}


_ENCODER = msgspec.msgpack.Encoder()  # vLLM's encoder: dicts as maps, bytes as bin, ints as (u)int64


def encode_batch(events: Sequence[KVEvent], ts: float, layout: str = "map", dp_rank: int = 0) -> bytes:
    """A KVEventBatch payload: `[ts, [event, ...], data_parallel_rank]` in msgpack."""
    batch = [ts, [encode_event(e, layout) for e in events], dp_rank]
    return _ENCODER.encode(batch)


@dataclass(frozen=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    topic: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    @classmethod
    def parse(cls, text: str) -> KVEventsConfig:
        """From `--kv-events-config` JSON; "" is disabled. ValueError on anything else malformed."""
        if not text.strip():
            return cls()
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"kv_events_config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("kv_events_config must be a JSON object")
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> KVEventsConfig:
        types: dict[str, tuple[type, ...]] = {
            "enable_kv_cache_events": (bool,),
            "publisher": (str,),
            "endpoint": (str,),
            "replay_endpoint": (str, type(None)),
            "buffer_steps": (int,),
            "hwm": (int,),
            "max_queue_size": (int,),  # vLLM's publisher queue; the simulator publishes inline
            "topic": (str,),
        }
        for key, value in raw.items():
            if key not in types:
                raise ValueError(f"kv_events_config: unknown key {key!r}; known: {', '.join(types)}")
            if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
                raise ValueError(f"kv_events_config: {key} has the wrong type ({type(value).__name__})")
        cfg = cls(**{k: v for k, v in raw.items() if k != "max_queue_size"})
        if cfg.publisher not in ("zmq", "null"):
            raise ValueError(f"kv_events_config: publisher must be zmq or null, got {cfg.publisher!r}")
        if cfg.buffer_steps < 1 or cfg.hwm < 0:
            raise ValueError("kv_events_config: buffer_steps must be positive and hwm not negative")
        if cfg.enabled and "://" not in cfg.endpoint:
            raise ValueError(f"kv_events_config: endpoint {cfg.endpoint!r} is not a ZMQ address")
        return cfg


def binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard, IPv6 any-address or local transport; connect to anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqEventPublisher:
    """PUB socket + replay ROUTER socket + a bounded buffer of recent batches, on the event loop.

    `publish` sends at once (a PUB socket never blocks: past the high-water mark ZMQ drops), so
    events leave in engine-step order with consecutive sequence numbers. `restart` is a new engine
    process on the same addresses: the sequence starts again at 0 and the replay buffer is empty."""

    def __init__(
        self,
        cfg: KVEventsConfig,
        layout: str = "map",
        topic: str | None = None,
        also_connect: Sequence[str] = (),
    ) -> None:
        """`topic` overrides cfg.topic; `also_connect`: addresses the PUB socket connects to as
        well as its own endpoint (a ZMQ socket may bind and connect at once), so subscribers of
        both topologies get the same messages."""
        if layout not in LAYOUTS:
            raise ValueError(f"kv events layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.cfg = cfg
        self.layout = layout
        self._ctx = zmq.asyncio.Context()
        self._topic = (cfg.topic if topic is None else topic).encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        self._seq = 0
        self.published = 0
        # A plain (blocking-API) socket: a PUB send never waits, and it returns no future to await.
        self._pub: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(cfg.hwm)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        try:
            if binds(cfg.endpoint):
                self._pub.bind(cfg.endpoint)
                self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._pub.connect(cfg.endpoint)
                self.endpoint = cfg.endpoint
            for address in also_connect:
                self._pub.connect(address)
            self.replay_endpoint: str | None = None
            if cfg.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(cfg.replay_endpoint)
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"kv events: cannot open {cfg.endpoint} / {cfg.replay_endpoint}: {exc}") from exc

    def start(self) -> None:
        """Serve replay requests (a task on the running loop) when there is a replay socket."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kv-replay")

    @property
    def next_sequence(self) -> int:
        return self._seq

    def publish(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        payload = encode_batch(events, time.time(), self.layout)
        seq = self._seq
        self._seq += 1
        # Past the high-water mark ZMQ drops the message, as vLLM's PUB socket does; replay still has it.
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        self._buffer.append((seq, payload))
        self.published += 1

    def restart(self) -> None:
        self._seq = 0
        self._buffer.clear()

    async def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            try:
                await self._answer_replay(sock, frames)
            except zmq.ZMQError as exc:  # the client went away mid-answer: drop the rest
                log.warning("kv events replay: %s", exc)

    async def _answer_replay(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv events: invalid replay request of %d frames", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                await sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        await sock.send_multipart((client, b"", END_SEQ, b""))

    async def close(self) -> None:
        task, self._replay_task = self._replay_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
