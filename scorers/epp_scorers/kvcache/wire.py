"""vLLM's KV-event messages, decoded: `[topic, sequence, payload]` frames, the msgpack
`KVEventBatch` payload and its tagged `BlockStored` / `BlockRemoved` / `AllBlocksCleared` events.

vLLM encodes its msgspec Structs either as arrays (`array_like`: `[tag, field, ...]`, the layout of
most released engines and of llm-d's decoder) or as maps tagged under `type` (engines whose
structs dropped `array_like`); the batch likewise is `[ts, events, dp_rank?]` or a map. Both are
accepted, in any mix. Trailing fields an older engine does not send take their defaults; fields a
newer engine adds are ignored. Anything else is a `WireError` (the subscriber counts and drops the
batch). The layout is documented in docs/kv-events.md#wire-format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from epp_scorers.kvcache.keys import key_of

MAX_TOPIC_BYTES: Final = 1024  # a topic names a pod and a model: longer is not an engine's

END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)  # the replay socket's end marker
DEFAULT_TIER: Final = "gpu"  # an event without `medium` is about the GPU cache (llm-d's default)
MAX_TIER_CHARS: Final = 64

_decoder = msgspec.msgpack.Decoder()


class WireError(ValueError):
    """A message or payload that is not vLLM's KV-event format."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    keys: tuple[int, ...]  # block keys (keys.key_of) of consecutive blocks of one sequence
    parent: int | None  # key of the block before the first, if any
    token_ids: tuple[int, ...]
    block_size: int
    tier: str
    lora_name: str | None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    keys: tuple[int, ...]
    tier: str


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    seq: int
    payload: bytes


def parse_frames(frames: Sequence[bytes]) -> Message:
    """A SUB socket's multipart message: [topic, 8-byte big-endian sequence, msgpack payload]."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames (topic, sequence, payload), got {len(frames)}")
    topic, seq, payload = frames
    if len(topic) > MAX_TOPIC_BYTES:
        raise WireError(f"topic of {len(topic)} bytes, past {MAX_TOPIC_BYTES}")
    if len(seq) != 8:
        raise WireError(f"sequence frame has {len(seq)} bytes, expected 8")
    try:
        text = bytes(topic).decode()
    except UnicodeDecodeError as exc:
        raise WireError("topic is not UTF-8") from exc
    return Message(text, int.from_bytes(seq, "big"), bytes(payload))


def parse_topic(topic: str) -> tuple[str, str]:
    """(pod, model) of llm-d's topic `kv@<pod>@<model>`; ("", "") for any other topic."""
    parts = topic.split("@")
    if len(parts) == 3 and parts[1]:
        return parts[1], parts[2]
    return "", ""


def decode_batch(payload: bytes) -> EventBatch:
    """The `KVEventBatch` in a message's payload."""
    try:
        raw = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"payload is not msgpack: {exc}") from exc
    if isinstance(raw, list | tuple):
        if len(raw) < 2:
            raise WireError("batch array has fewer than 2 fields (ts, events)")
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    else:
        raise WireError(f"batch is a msgpack {type(raw).__name__}, expected an array or a map")
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise WireError("batch needs a numeric ts and an events array")
    if rank is not None and not isinstance(rank, int):
        raise WireError("data_parallel_rank is not an integer")
    return EventBatch(float(ts), tuple(_event(e) for e in events), rank)


_FIELDS: Final = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}
_REQUIRED: Final = {"BlockStored": 4, "BlockRemoved": 1, "AllBlocksCleared": 0}


def _event(raw: Any) -> Event:
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        tag = raw[0]
        names = _FIELDS.get(tag)
        if names is None:
            raise WireError(f"unknown event tag {tag!r}")
        values = raw[1:]
        if len(values) < _REQUIRED[tag]:
            raise WireError(f"{tag} has {len(values)} fields, expected at least {_REQUIRED[tag]}")
        fields = dict(zip(names, values, strict=False))
    elif isinstance(raw, dict) and isinstance(raw.get("type"), str):
        tag = raw["type"]
        if tag not in _FIELDS:
            raise WireError(f"unknown event tag {tag!r}")
        fields = raw
        missing = [n for n in _FIELDS[tag][: _REQUIRED[tag]] if n not in fields]
        if missing:
            raise WireError(f"{tag} lacks {', '.join(missing)}")
    else:
        raise WireError("event is neither a tagged array nor a tagged map")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    keys = _keys(fields["block_hashes"])
    tier = _tier(fields.get("medium"))
    if tag == "BlockRemoved":
        return BlockRemoved(keys, tier)
    parent = fields.get("parent_block_hash")
    token_ids = fields["token_ids"]
    block_size = fields["block_size"]
    lora_name = fields.get("lora_name")
    if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
        raise WireError("BlockStored token_ids is not an array of integers")
    if not isinstance(block_size, int) or block_size <= 0:
        raise WireError("BlockStored block_size is not a positive integer")
    if lora_name is not None and not isinstance(lora_name, str):
        raise WireError("BlockStored lora_name is not a string")
    return BlockStored(
        keys,
        None if parent is None else _key(parent),
        tuple(token_ids),
        block_size,
        tier,
        lora_name,
    )


def _key(value: Any) -> int:
    if isinstance(value, bytes | int) and not isinstance(value, bool):
        return key_of(value)
    raise WireError(f"block hash is a {type(value).__name__}, expected bytes or an integer")


def _keys(values: Any) -> tuple[int, ...]:
    if not isinstance(values, list):
        raise WireError("block_hashes is not an array")
    return tuple(_key(v) for v in values)


def _tier(medium: Any) -> str:
    if medium is None:
        return DEFAULT_TIER
    if not isinstance(medium, str):
        raise WireError("medium is not a string")
    if len(medium) > MAX_TIER_CHARS:  # kept with every holder of a block: a tier name, not a text
        raise WireError(f"medium is {len(medium)} characters long (at most {MAX_TIER_CHARS})")
    return medium.lower() or DEFAULT_TIER
