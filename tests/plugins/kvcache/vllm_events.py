"""vLLM's KV-event schema (vllm/distributed/kv_events.py) as msgspec Structs, in both layouts
vLLM has shipped (array_like events and map events tagged under `type`), and a publisher with
vLLM's sockets and protocol: PUB [topic, seq, payload] and a ROUTER replay socket. The tests
build their events with these, as a vLLM engine would."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapEventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[Any]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[Any]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class MapKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class MapBlockStored(MapKVCacheEvent, tag="BlockStored"):
    block_hashes: list[Any]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None


class MapBlockRemoved(MapKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[Any]
    medium: str | None
    group_idx: int | None = None


class MapAllBlocksCleared(MapKVCacheEvent, tag="AllBlocksCleared"):
    pass


_encoder = msgspec.msgpack.Encoder()


def encode(events: list[Any], ts: float = 1.0, *, as_map: bool = False) -> bytes:
    batch = MapEventBatch(ts, events) if as_map else EventBatch(ts, events)
    return _encoder.encode(batch)


def stored(
    hashes: list[bytes], tokens: list[int], parent: bytes | None = None, medium: str = "GPU"
) -> BlockStored:
    return BlockStored(hashes, parent, tokens, 16, None, medium, None)


END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Publisher:
    """vLLM's ZmqEventPublisher, as far as the wire goes: PUB (bind or connect), a sequence from 0,
    a ROUTER replay socket over the last `buffer` batches."""

    def __init__(
        self,
        endpoint: str,
        topic: str,
        replay_endpoint: str | None = None,
        buffer: int = 100,
        *,
        bind: bool = False,
    ) -> None:
        ctx = zmq.asyncio.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if "*" in endpoint or bind:  # vLLM binds on a wildcard; `bind` stands for a pod's own IP
            self.pub.bind(endpoint)
            self.endpoint = bytes(self.pub.getsockopt(zmq.LAST_ENDPOINT)).decode()
        else:
            self.pub.connect(endpoint)
            self.endpoint = endpoint
        self.topic = topic.encode()
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer)
        self.router: zmq.asyncio.Socket | None = None
        self.replay_endpoint = ""
        self._replays: asyncio.Task[None] | None = None
        if replay_endpoint:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(replay_endpoint)
            self.replay_endpoint = bytes(self.router.getsockopt(zmq.LAST_ENDPOINT)).decode()
            self._replays = asyncio.get_running_loop().create_task(self._serve())

    async def publish(self, payload: bytes, *, drop: bool = False) -> int:
        """Send one batch (or, with drop, only buffer it: a message lost on the way)."""
        seq = self.seq
        self.seq += 1
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        self.buffer.append((seq, payload))
        return seq

    def restart(self) -> None:
        """A new engine process: the sequence starts at 0 again, the replay buffer is empty."""
        self.seq = 0
        self.buffer.clear()

    async def _serve(self) -> None:
        assert self.router is not None
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= first:
                    await self.router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([client, b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._replays is not None:
            self._replays.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replays
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)
