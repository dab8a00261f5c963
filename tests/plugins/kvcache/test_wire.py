"""vLLM's KV-event batches, encoded by vLLM's own msgspec schema in both layouts, decode to the
events they hold; anything else is refused with a clear error."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from epp_scorers.kvcache.keys import block_hashes, key_of
from epp_scorers.kvcache.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    WireError,
    decode_batch,
    parse_frames,
    parse_topic,
)
from tests.plugins.kvcache import vllm_events as v

TOKENS = list(range(48))
HASHES = block_hashes(TOKENS, hash_seed="0")


@pytest.mark.parametrize("as_map", [False, True], ids=["array_like", "map"])
def test_a_batch_in_vllms_layouts_decodes(as_map: bool) -> None:
    events: list[Any]
    if as_map:
        events = [
            v.MapBlockStored(HASHES[1:], HASHES[0], TOKENS[16:], 16, None, "GPU", "adapter"),
            v.MapBlockRemoved([HASHES[2]], "CPU"),
            v.MapAllBlocksCleared(),
        ]
    else:
        events = [
            v.BlockStored(HASHES[1:], HASHES[0], TOKENS[16:], 16, None, "GPU", "adapter"),
            v.BlockRemoved([HASHES[2]], "CPU"),
            v.AllBlocksCleared(),
        ]
    batch = decode_batch(v.encode(events, ts=12.5, as_map=as_map))
    assert batch.ts == 12.5
    stored, removed, cleared = batch.events
    assert stored == BlockStored(
        (key_of(HASHES[1]), key_of(HASHES[2])), key_of(HASHES[0]), tuple(TOKENS[16:]), 16, "gpu", "adapter"
    )
    assert removed == BlockRemoved((key_of(HASHES[2]),), "cpu")
    assert cleared == AllBlocksCleared()


def test_integer_hashes_older_and_newer_field_lists() -> None:
    as_int = [int.from_bytes(h, "big") & ((1 << 64) - 1) for h in HASHES]
    newer = v.BlockStored(as_int, None, TOKENS, 16, None, None, None, [None, None, None], 0)
    older = ["BlockStored", as_int, None, TOKENS, 16]  # before lora_id / medium / lora_name
    payload = msgspec.msgpack.encode([0.0, [msgspec.to_builtins(newer), older]])
    a, b = decode_batch(payload).events
    assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
    assert a.keys == b.keys == tuple(key_of(h) for h in HASHES)
    assert a.tier == b.tier == "gpu"  # no medium: the GPU cache


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\xc1", "not msgpack"),
        (msgspec.msgpack.encode("x"), "expected an array or a map"),
        (msgspec.msgpack.encode([1.0]), "fewer than 2 fields"),
        (msgspec.msgpack.encode([1.0, [["Nope"]]]), "unknown event tag 'Nope'"),
        (msgspec.msgpack.encode([1.0, [["BlockStored", [1]]]]), "at least 4"),
        (msgspec.msgpack.encode([1.0, [["BlockRemoved", ["x"], None]]]), "block hash is a str"),
        (msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1], 0]]]), "block_size"),
        (msgspec.msgpack.encode({"ts": 1.0, "events": [{"type": "BlockRemoved"}]}), "lacks block_hashes"),
        (msgspec.msgpack.encode([1.0, [7]]), "neither a tagged array"),
        (
            msgspec.msgpack.encode([1.0, [["BlockRemoved", [1], "x" * 100_000]]]),
            "medium is 100000 characters",
        ),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode_batch(payload)


def test_frames_and_topic() -> None:
    message = parse_frames([b"kv@10.0.0.7@Qwen/Qwen3-32B", (5).to_bytes(8, "big"), b"p"])
    assert (message.topic, message.seq, message.payload) == ("kv@10.0.0.7@Qwen/Qwen3-32B", 5, b"p")
    assert parse_topic(message.topic) == ("10.0.0.7", "Qwen/Qwen3-32B")
    assert parse_topic("kv@127.0.0.1:8001@m") == ("127.0.0.1:8001", "m")
    assert parse_topic("other") == ("", "")
    with pytest.raises(WireError, match="expected 3 frames"):
        parse_frames([b"t", b"p"])
    with pytest.raises(WireError, match="sequence frame has 4 bytes"):
        parse_frames([b"t", b"\0\0\0\1", b"p"])
