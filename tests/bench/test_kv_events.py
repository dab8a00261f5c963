"""The simulator's KV events, read off a real ZMQ socket by an independent reader.

The reader here is written from vLLM's schema (kv_events.py: KVEventBatch, BlockStored,
BlockRemoved, AllBlocksCleared; ZmqEventPublisher's frames and replay protocol) with the plain
`msgpack` package, not with the simulator's encoder (msgspec), and the expected block hashes come
from vLLM's formula written out below, not from the simulator's hasher.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio

from epp_bench.make_tokenizer import write_tokenizer
from epp_bench.sim import SimConfig, Simulator
from epp_bench.sim.token_source import HFTokens
from tests.conftest import StartSim

pytestmark = pytest.mark.timeout(30)

SEED = "42"
BLOCK = 16
# vLLM's field order (kv_events.py); the "array" layout carries them positionally after the tag.
FIELDS = {
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


def vllm_hashes(token_ids: Sequence[int], parent: bytes | None = None) -> list[bytes]:
    """vLLM's sha256 block hashes (pickle, highest protocol), NONE_HASH = sha256(pickle(SEED))."""

    def h(value: Any) -> bytes:
        return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()

    prev = parent or h(SEED)
    out = []
    for start in range(0, len(token_ids) - BLOCK + 1, BLOCK):
        prev = h((prev, tuple(token_ids[start : start + BLOCK]), None))
        out.append(prev)
    return out


def as_int(digest: bytes) -> int:
    return int.from_bytes(digest[-8:], "big")


def decode_event(raw: Any) -> dict[str, Any]:
    if isinstance(raw, list):  # array layout: [tag, field, ...]
        tag, values = raw[0], raw[1:]
        return {"type": tag, **dict(zip(FIELDS[tag], values, strict=False))}
    assert isinstance(raw, dict) and raw["type"] in FIELDS, raw
    return dict(raw)


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    assert isinstance(batch, list) and len(batch) in (2, 3), batch  # [ts, events, dp_rank?]
    ts, events = batch[0], batch[1]
    assert isinstance(ts, float)
    return ts, [decode_event(e) for e in events], batch[2] if len(batch) == 3 else None


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return path


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


def events_config(**extra: Any) -> str:
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:*",
        "replay_endpoint": "tcp://127.0.0.1:*",
        "topic": "kv@sim@sim-model",
        **extra,
    }
    return orjson.dumps(cfg).decode()


async def event_sim(start_sim: StartSim, tokenizer_dir: Path, **knobs: Any) -> Simulator:
    knobs.setdefault("kv_events_config", events_config())
    return await start_sim(tokenizer=str(tokenizer_dir), python_hash_seed=SEED, **knobs)


async def subscribe(ctx: zmq.asyncio.Context, sim: Simulator) -> zmq.asyncio.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    assert sim.kv_events_endpoint is not None
    sub.connect(sim.kv_events_endpoint)
    # ZMQ's slow joiner: the subscription must reach the PUB socket first (a loaded machine may
    # take a while to run ZMQ's I/O thread).
    await asyncio.sleep(0.6)
    return sub


async def receive(sub: zmq.asyncio.Socket) -> tuple[bytes, int, bytes]:
    topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
    assert len(seq) == 8
    return topic, int.from_bytes(seq, "big"), payload


async def complete(
    session: aiohttp.ClientSession, sim: Simulator, prompt: Any, max_tokens: int
) -> dict[str, Any]:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens}
    async with session.post(f"{sim.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def words(n: int, offset: int = 0) -> str:
    """n in-vocabulary words, distinct for distinct offsets."""
    letters = "bcdfghjklmnpqrstvwxz"
    return " ".join(
        letters[(i + offset) % 20] + "aeiou"[(i // 20 + offset) % 5] + letters[(i // 100 + offset) % 20]
        for i in range(n)
    )


class Index:
    """What a consumer learns from the events: the set of blocks the pod holds."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self.events: list[dict[str, Any]] = []

    def apply(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self.events.append(e)
            if e["type"] == "BlockStored":
                self.blocks.update(e["block_hashes"])
            elif e["type"] == "BlockRemoved":
                assert set(e["block_hashes"]) <= self.blocks, "removed a block never stored"
                self.blocks.difference_update(e["block_hashes"])
            else:
                self.blocks.clear()


def held(sim: Simulator) -> set[int]:
    """The blocks the simulator's cache really holds, in the events' 64-bit form."""
    return {as_int(h) for h in sim.engine.kv._refs if isinstance(h, bytes)}


async def drain(sub: zmq.asyncio.Socket, index: Index, seqs: list[int], until: float = 0.3) -> None:
    """Apply every batch that arrives until the socket has been quiet for `until` seconds."""
    while True:
        try:
            topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), until)
        except TimeoutError:
            return
        assert topic == b"kv@sim@sim-model"
        seqs.append(int.from_bytes(seq, "big"))
        _, events, rank = decode_batch(payload)
        assert rank == 0
        index.apply(events)


async def test_stored_events_carry_vllm_hashes_and_token_ids(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    sim = await event_sim(start_sim, tokenizer_dir)
    sub = await subscribe(zctx, sim)
    prompt = words(40) + " "  # 40 tokens: 2 full blocks and 8 tokens of a third
    ids = HFTokens(str(tokenizer_dir)).encode(prompt)
    assert len(ids) == 40 and 0 not in ids  # every word is in the vocabulary (0 is <unk>)
    result = await complete(session, sim, prompt, max_tokens=10)  # 50 tokens in all: 3 full blocks
    assert result["usage"]["prompt_tokens"] == 40

    index, seqs = Index(), []
    await drain(sub, index, seqs)
    assert seqs == list(range(len(seqs))) and seqs, "sequence numbers run from 0 without gaps"
    stored = [e for e in index.events if e["type"] == "BlockStored"]
    expected = vllm_hashes(ids)
    assert stored[0]["block_hashes"] == [as_int(h) for h in expected]
    assert stored[0]["parent_block_hash"] is None
    assert stored[0]["token_ids"] == ids[:32]
    assert stored[0]["block_size"] == BLOCK and stored[0]["medium"] == "GPU"
    assert stored[0]["lora_id"] is None and stored[0]["lora_name"] is None
    # The third block filled during generation: prompt tokens then the answer's word ids.
    answer_ids = HFTokens(str(tokenizer_dir)).encode(result["choices"][0]["text"])
    all_ids = ids + answer_ids
    assert stored[1]["parent_block_hash"] == as_int(expected[-1])
    assert stored[1]["token_ids"] == all_ids[32:48]
    assert stored[1]["block_hashes"] == [as_int(h) for h in vllm_hashes(all_ids[32:48], parent=expected[-1])]
    assert index.blocks == held(sim)


async def test_eviction_reported_and_index_tracks_the_cache(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    sim = await event_sim(start_sim, tokenizer_dir, kv_cache_blocks=12)
    sub = await subscribe(zctx, sim)
    index, seqs = Index(), []
    for i in range(6):  # 6 prompts of 5 blocks + output in a 12-block cache: the LRU must evict
        await complete(session, sim, words(80, offset=i * 7) + " ", max_tokens=4)
        await drain(sub, index, seqs, until=0.5)
        assert index.blocks == held(sim), f"after request {i}"
    assert sim.engine.kv.evictions > 0
    assert any(e["type"] == "BlockRemoved" for e in index.events)
    assert seqs == list(range(len(seqs)))


async def test_replay_returns_buffered_batches_then_end_marker(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    sim = await event_sim(start_sim, tokenizer_dir, kv_events_config=events_config(buffer_steps=3))
    sub = await subscribe(zctx, sim)
    live: dict[int, bytes] = {}
    for i in range(4):
        await complete(session, sim, words(20, offset=i) + " ", max_tokens=2)
        _, seq, payload = await receive(sub)
        live[seq] = payload
    assert sorted(live) == [0, 1, 2, 3]
    dealer = zctx.socket(zmq.DEALER)
    assert sim.kv_events_replay_endpoint is not None
    dealer.connect(sim.kv_events_replay_endpoint)
    await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    replayed: dict[int, bytes] = {}
    while True:
        empty, seq_bytes, payload = await asyncio.wait_for(dealer.recv_multipart(), 5)
        assert empty == b""
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if seq == -1:
            assert payload == b""
            break
        replayed[seq] = payload
    # buffer_steps=3: the oldest batch is gone, the rest come back byte for byte.
    assert replayed == {s: live[s] for s in (1, 2, 3)}
    await dealer.send_multipart([b"", (3).to_bytes(8, "big")])
    _, seq_bytes, payload = await asyncio.wait_for(dealer.recv_multipart(), 5)
    assert int.from_bytes(seq_bytes, "big") == 3 and payload == live[3]


async def test_reset_and_restart_clear_all_blocks(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    sim = await event_sim(start_sim, tokenizer_dir)
    sub = await subscribe(zctx, sim)
    index, seqs = Index(), []
    await complete(session, sim, words(48) + " ", max_tokens=2)
    await drain(sub, index, seqs)
    assert index.blocks
    async with session.post(f"{sim.url}/reset_prefix_cache") as resp:
        assert resp.status == 200
    await drain(sub, index, seqs)
    assert index.events[-1] == {"type": "AllBlocksCleared"} and not held(sim)

    await complete(session, sim, words(48, offset=3) + " ", max_tokens=2)
    await drain(sub, index, seqs)
    last_seq = seqs[-1]
    async with session.post(f"{sim.url}/sim/restart") as resp:  # a pod restart (Simulator.restart)
        assert resp.status == 200  # the stream starts again at 0 with AllBlocksCleared
    _, seq, payload = await receive(sub)
    assert seq == 0 and last_seq > 0
    assert decode_batch(payload)[1] == [{"type": "AllBlocksCleared"}]
    assert not held(sim)
    await complete(session, sim, words(48, offset=3) + " ", max_tokens=2)  # serves again, a cold cache
    _, seq, payload = await receive(sub)
    assert seq == 1 and decode_batch(payload)[1][0]["type"] == "BlockStored"


async def test_array_layout_and_bytes_hashes(
    start_sim: StartSim,
    tokenizer_dir: Path,
    session: aiohttp.ClientSession,
    zctx: zmq.asyncio.Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "0")
    sim = await event_sim(start_sim, tokenizer_dir, kv_events_layout="array")
    sub = await subscribe(zctx, sim)
    prompt = words(32) + " "
    await complete(session, sim, prompt, max_tokens=1)
    _, _, payload = await receive(sub)
    raw = msgpack.unpackb(payload, raw=False)[1][0]
    assert isinstance(raw, list) and raw[0] == "BlockStored"
    ids = HFTokens(str(tokenizer_dir)).encode(prompt)
    assert decode_event(raw)["block_hashes"] == vllm_hashes(ids)  # the 32-byte digests


async def test_token_id_prompts_and_render_use_the_tokenizer(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    sim = await event_sim(start_sim, tokenizer_dir)
    tokens = HFTokens(str(tokenizer_dir))
    text = words(33) + " "
    async with session.post(f"{sim.url}/v1/completions/render", json={"prompt": text}) as resp:
        rendered = (await resp.json())[0]["token_ids"]
    assert rendered == tokens.encode(text)
    messages = [{"role": "user", "content": words(20)}]
    async with session.post(f"{sim.url}/tokenize", json={"messages": messages}) as resp:
        chat_ids = (await resp.json())["tokens"]
    assert chat_ids[0] == tokens.encode("<|user|>")[0] and chat_ids[-1] == tokens.encode("<|assistant|>")[0]
    assert len(chat_ids) == 22
    # The same prompt sent as ids hits the blocks the text cached.
    await complete(session, sim, text, max_tokens=1)
    again = await complete(session, sim, rendered, max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


def test_events_off_keeps_the_simulator_as_it_was() -> None:
    from epp_bench.sim.engine import Engine

    engine = Engine(SimConfig())
    assert not engine.vllm_block_keys and not engine.kv.journal
    req = engine.new_request("x" * 200, 4, False)
    assert req.token_ids is None and all(isinstance(h, int) for h in req.hashes)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher must be zmq or null"),
        ('{"enable_kv_cache_events": true, "endpint": "tcp://*:5557"}', "unknown key 'endpint'"),
        ('{"enable_kv_cache_events": "yes"}', "wrong type"),
        ('{"enable_kv_cache_events": true, "endpoint": "localhost:5557"}', "not a ZMQ address"),
    ],
)
def test_bad_kv_events_config_is_refused(config: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(kv_events_config=config).validate()


def test_cli_refuses_a_bad_kv_events_config() -> None:
    config = '{"enable_kv_cache_events": true, "publisher": "kafka"}'
    run = subprocess.run(
        [sys.executable, "-m", "epp_bench.sim", "--kv-events-config", config, "--base-port", "0"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert run.returncode == 2 and "publisher must be zmq or null" in run.stderr


def test_unknown_hash_algo_and_missing_tokenizer_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown prefix caching hash algorithm 'md5'"):
        SimConfig(prefix_caching_hash_algo="md5").validate()
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        HFTokens(str(tmp_path))


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
async def test_published_keys_equal_epps_block_keys(
    algo: str,
    start_sim: StartSim,
    tokenizer_dir: Path,
    session: aiohttp.ClientSession,
    zctx: zmq.asyncio.Context,
) -> None:
    """The keys epp computes from a prompt's token ids (its kvcache.keys, the function the
    precise scorer uses) are the keys the engine publishes for that prompt's blocks."""
    from epp_scorers.kvcache.keys import block_keys

    sim = await event_sim(start_sim, tokenizer_dir, prefix_caching_hash_algo=algo)
    sub = await subscribe(zctx, sim)
    ids = HFTokens(str(tokenizer_dir)).encode(words(70) + " ")
    for salt in (None, "tenant-a"):
        body: dict[str, Any] = {"model": "sim-model", "prompt": ids, "max_tokens": 1}
        if salt:
            body["cache_salt"] = salt
        async with session.post(f"{sim.url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
        _, _, payload = await receive(sub)
        stored = decode_batch(payload)[1][0]
        assert stored["type"] == "BlockStored"
        assert stored["block_hashes"] == block_keys(
            ids, block_size=BLOCK, hash_seed=SEED, algo=algo, cache_salt=salt
        )
    assert block_keys(ids, hash_seed=SEED, algo=algo) != block_keys(ids, hash_seed="7", algo=algo)


async def test_instance_topic_and_a_bound_subscriber_get_the_same_stream(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    """llm-d's other topology: the subscriber binds and the engine connects (`kv_events_connect`,
    the simulator's addition, beside the endpoint it binds); the topic names the instance."""
    bound = zctx.socket(zmq.SUB)
    bound.setsockopt(zmq.SUBSCRIBE, b"kv@")
    port = bound.bind_to_random_port("tcp://127.0.0.1")
    config = events_config(topic="kv@{address}@{model}")
    sim = await event_sim(
        start_sim, tokenizer_dir, kv_events_config=config, kv_events_connect=f"tcp://127.0.0.1:{port}"
    )
    # A bound SUB socket hands its subscription to a connecting PUB only while it is being read.
    from_bound = asyncio.create_task(receive(bound))
    sub = await subscribe(zctx, sim)  # and one subscriber connected to the endpoint it binds
    await complete(session, sim, words(20) + " ", max_tokens=1)
    got_bound, got_sub = await from_bound, await receive(sub)
    assert got_bound == got_sub
    assert got_bound[0] == f"kv@{sim.address}@sim-model".encode() and got_bound[1] == 0


async def test_chat_rendered_by_epps_tokenizer_equals_the_simulators(
    start_sim: StartSim, tokenizer_dir: Path, session: aiohttp.ClientSession
) -> None:
    """The tokenizer directory's chat template (what epp's `tokenizer` plugin applies, as vLLM
    does) renders messages exactly as the simulator's engine does, so both get the same ids."""
    from epp_bench.sim.text import chat_prompt
    from epp_scorers.kvcache.tokenize import load_tokenizer

    epp_tokenizer = load_tokenizer(str(tokenizer_dir))
    sim = await event_sim(start_sim, tokenizer_dir)
    conversations = [
        [{"role": "user", "content": words(20)}],
        [
            {"role": "system", "content": words(30, offset=1)},
            {"role": "user", "content": words(5, offset=2)},
            {"role": "assistant", "content": "the and for"},
            {"role": "user", "content": words(7, offset=3)},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            text = epp_tokenizer.render_chat(body)
            assert text == chat_prompt(messages, add_generation_prompt)
            async with session.post(f"{sim.url}/v1/chat/completions/render", json=body) as resp:
                assert resp.status == 200
                sim_ids = (await resp.json())["token_ids"]
            assert epp_tokenizer.encode(text, special_tokens=False) == sim_ids
