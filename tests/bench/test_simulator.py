"""The vLLM simulator (epp_bench.sim) over real HTTP on loopback: API shape, KV cache, queueing, metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.sim import BLOCK_CHARS, BLOCK_SIZE_TOKENS, SERVED_BY, Simulator
from epp_bench.sim.kv_cache import KVCache
from epp_bench.sim.text import chat_prompt
from tests.conftest import StartSim

pytestmark = pytest.mark.timeout(30)

MODEL = "sim-model"


def url(sim: Simulator, path: str) -> str:
    return f"http://127.0.0.1:{sim.port}{path}"


async def metrics(session: aiohttp.ClientSession, sim: Simulator) -> dict[str, float]:
    """Sample name -> value, summed over label sets (one model, so one set each)."""
    async with session.get(url(sim, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers[SERVED_BY] == sim.name
        text = await resp.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def complete(session: aiohttp.ClientSession, sim: Simulator, **body: Any) -> dict[str, Any]:
    body.setdefault("model", MODEL)
    async with session.post(url(sim, "/v1/completions"), json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers[SERVED_BY] == sim.name
        result: dict[str, Any] = await resp.json()
        return result


async def stream_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE response, in order (the last one should be [DONE])."""
    raw = (await resp.read()).decode()
    events = [block.strip() for block in raw.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


def prompt_of(tag: str, n_chars: int) -> str:
    return (tag * n_chars)[:n_chars]


# -- API shape --------------------------------------------------------------------------------------


async def test_models_health_and_static_metrics(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(name="pod-a", kv_cache_blocks=123)
    async with session.get(url(sim, "/v1/models")) as resp:
        assert resp.status == 200
        assert resp.headers[SERVED_BY] == "pod-a"
        body = await resp.json()
    assert [m["id"] for m in body["data"]] == [MODEL]
    async with session.get(url(sim, "/health")) as resp:
        assert resp.status == 200
        assert resp.headers[SERVED_BY] == "pod-a"
    async with session.get(url(sim, "/metrics")) as resp:
        text = await resp.text()
    assert 'vllm:cache_config_info{block_size="16",num_gpu_blocks="123"} 1.0' in text
    assert 'vllm:lora_requests_info{max_lora="0",running_lora_adapters="",waiting_lora_adapters=""}' in text
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0' in text


async def test_unknown_model_is_404(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    for path, extra in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": []})):
        async with session.post(url(sim, path), json={"model": "nope", **extra}) as resp:
            assert resp.status == 404
            assert resp.headers[SERVED_BY] == sim.name
            error = (await resp.json())["error"]
            assert "nope" in error["message"] and error["code"] == 404


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b""),
        ("/v1/completions", b"[1, 2]"),
        ("/v1/completions", b'{"model": "sim-model"}'),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}'),
        ("/v1/completions", b'{"prompt": ["a", "b"]}'),
        ("/v1/chat/completions", b'{"model": "sim-model"}'),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b'{"messages": ["hi"]}'),
    ],
)
async def test_bad_requests_are_400(
    start_sim: StartSim, session: aiohttp.ClientSession, path: str, body: bytes
) -> None:
    sim = await start_sim()
    async with session.post(url(sim, path), data=body, headers={"content-type": "application/json"}) as resp:
        assert resp.status == 400
        assert resp.headers[SERVED_BY] == sim.name
        assert (await resp.json())["error"]["code"] == 400
    assert sim.stats.requests_received == 0


async def test_request_larger_than_the_cache_is_400(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(kv_cache_blocks=4)
    async with session.post(
        url(sim, "/v1/completions"), json={"prompt": "x" * 400, "max_tokens": 10}
    ) as resp:
        assert resp.status == 400
        assert "KV blocks" in (await resp.json())["error"]["message"]


async def test_non_streaming_completion_and_chat(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    body = await complete(session, sim, prompt="hello world!", max_tokens=7)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["text"]) == 7 * 4
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 7,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with session.post(url(sim, "/v1/chat/completions"), json={"messages": messages}) as resp:
        chat = await resp.json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 16  # the default max_tokens
    assert chat["usage"]["prompt_tokens"] == -(-len(chat_prompt(messages)) // 4)


async def test_streaming_completion_sse(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    prompt = prompt_of("stream me ", 300)
    request = {"model": MODEL, "prompt": prompt, "max_tokens": 25, "stream": True}
    request["stream_options"] = {"include_usage": True}
    async with session.post(url(sim, "/v1/completions"), json=request) as resp:
        assert resp.status == 200
        assert resp.headers[SERVED_BY] == sim.name
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = await stream_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == 25
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 24 + ["length"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == 25 and usage["prompt_tokens"] == 75
    # The same prompt answers the same text streamed or not (greedy-like determinism).
    text = "".join(c["choices"][0]["text"] for c in token_chunks)
    body = await complete(session, sim, prompt=prompt, max_tokens=25)
    assert body["choices"][0]["text"] == text


async def test_stream_interval_batches_tokens_but_sends_them_all(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(stream_interval=4)
    request = {"prompt": "batch me", "max_tokens": 10, "stream": True}
    async with session.post(url(sim, "/v1/completions"), json=request) as resp:
        events = await stream_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 10 and chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_streaming_chat_sse_without_usage(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": True}
    async with session.post(url(sim, "/v1/chat/completions"), json=request) as resp:
        events = await stream_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(contents) == 9 and all(len(c) == 4 for c in contents)
    assert all("usage" not in c for c in chunks)


# -- KV cache ---------------------------------------------------------------------------------------


async def test_repeated_prefix_hits_the_cache(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    prefix = prompt_of("shared system prompt. ", 10 * BLOCK_CHARS)  # exactly 10 blocks
    first = await complete(session, sim, prompt=prefix + "question one?", max_tokens=4)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    before = await metrics(session, sim)
    second = await complete(session, sim, prompt=prefix + "another question", max_tokens=4)
    after = await metrics(session, sim)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 10 * BLOCK_SIZE_TOKENS
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert hits == cached
    assert queries == second["usage"]["prompt_tokens"]
    # A prompt differing in its first character shares no block: hashes are chained.
    third = await complete(session, sim, prompt="X" + prefix[1:] + "question one?", max_tokens=4)
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_full_hit_recomputes_the_last_token(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    prompt = prompt_of("abcd", 4 * BLOCK_CHARS)  # 64 tokens, 4 full blocks
    await complete(session, sim, prompt=prompt, max_tokens=2)
    again = await complete(session, sim, prompt=prompt, max_tokens=2)
    # As in vLLM, at least one prompt token is computed, so the last block can't be a hit.
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * BLOCK_SIZE_TOKENS


async def test_multi_turn_chat_reuses_the_previous_answer(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    messages: list[dict[str, str]] = [
        {"role": "system", "content": prompt_of("You are a helpful assistant. ", 500)},
        {"role": "user", "content": "first question"},
    ]
    async with session.post(
        url(sim, "/v1/chat/completions"), json={"messages": messages, "max_tokens": 64}
    ) as r:
        answer = (await r.json())["choices"][0]["message"]["content"]
    turn_one_text = chat_prompt(messages) + answer
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    async with session.post(
        url(sim, "/v1/chat/completions"), json={"messages": messages, "max_tokens": 4}
    ) as r:
        second = await r.json()
    # Blocks filled by the generated answer were cached too, so the hit reaches past the old prompt.
    expected = len(turn_one_text) // BLOCK_CHARS * BLOCK_SIZE_TOKENS
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == expected
    assert expected > -(-len(chat_prompt(messages[:2])) // 4)


async def test_eviction_under_pressure(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    # Each request: 5 prompt blocks + 16 output tokens = 6 blocks; the cache holds 4 such requests.
    sim = await start_sim(kv_cache_blocks=24)
    target = prompt_of("the prompt to lose ", 5 * BLOCK_CHARS)
    await complete(session, sim, prompt=target, max_tokens=16)
    hit = await complete(session, sim, prompt=target, max_tokens=16)
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * BLOCK_SIZE_TOKENS
    assert sim.engine.kv.evictions == 0
    for i in range(6):
        other = await complete(
            session, sim, prompt=prompt_of(f"other prompt {i} ", 5 * BLOCK_CHARS), max_tokens=16
        )
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert sim.engine.kv.evictions > 0
    miss = await complete(session, sim, prompt=target, max_tokens=16)
    assert miss["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_kv_cache_referenced_blocks_are_never_evicted() -> None:
    kv = KVCache(6)
    running = kv.allocate([1, 2, 3], 0, 4)  # 3 hashed prompt blocks + 1 anonymous
    assert running is not None and kv.used_blocks == 4
    done = kv.allocate([7, 8], 0, 2)
    assert done is not None
    kv.release(done)
    assert kv.used_blocks == 4 and kv.cached_blocks == 5 and kv.usage == pytest.approx(4 / 6)
    # 4 new blocks: 0 free, 2 evictable (7, 8), the 4 of `running` are off limits.
    assert kv.allocate([20, 21, 22, 23], 0, 4) is None
    bigger = kv.allocate([30, 31], 0, 2)
    assert bigger is not None and kv.evictions == 2
    assert 7 not in kv and 8 not in kv and all(h in kv for h in (1, 2, 3))
    assert kv.match([1, 2, 3, 4], 10) == 3 and kv.match([1, 2, 3], 2) == 2


def test_kv_cache_evicts_the_tail_of_a_prefix_first() -> None:
    kv = KVCache(4)
    alloc = kv.allocate([1, 2, 3], 0, 3)
    assert alloc is not None
    kv.release(alloc)
    newcomer = kv.allocate([9, 10], 0, 2)  # needs 1 block beyond the free one: evicts block 3
    assert newcomer is not None
    assert kv.match([1, 2, 3], 3) == 2 and 3 not in kv
    assert kv.reset() == 2 and kv.cached_blocks == 2 and kv.used_blocks == 2


# -- capacity and time ------------------------------------------------------------------------------


async def _stream_timed(
    session: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any]
) -> tuple[float, float]:
    """(time to first token, end) in real seconds since the call, for a streaming completion."""
    start = time.monotonic()
    first = 0.0
    async with session.post(url(sim, "/v1/completions"), json={**body, "stream": True}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {") and not first:
                first = time.monotonic() - start
    return first, time.monotonic() - start


async def test_queueing_at_max_num_seqs(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    # 100 tokens x 20 ms x 0.5 = 1 s of real decode per request (room for a loaded CI box); one slot.
    sim = await start_sim(max_num_seqs=1, time_factor=0.5)
    body = {"prompt": "queue me", "max_tokens": 100}
    first = asyncio.create_task(_stream_timed(session, sim, body))
    await wait_for(lambda: sim.engine.num_running == 1)
    second = asyncio.create_task(_stream_timed(session, sim, body))
    seen_waiting = 0.0
    while not first.done():
        values = await metrics(session, sim)
        seen_waiting = max(seen_waiting, values["vllm:num_requests_waiting"])
        assert values["vllm:num_requests_running"] <= 1
        await asyncio.sleep(0.01)
    assert seen_waiting == 1
    (ttft1, end1), (ttft2, _) = await first, await second
    assert ttft2 > ttft1 + 0.5 * (end1 - ttft1)  # the second only starts once the first is done
    assert sim.stats.peak_running == 1 and sim.stats.peak_waiting >= 1


async def test_full_waiting_queue_answers_429(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    # 1 s a request: two more requests must arrive while the first runs, even on a loaded machine.
    sim = await start_sim(max_num_seqs=1, max_waiting=1, time_factor=0.5)
    body = {"prompt": "busy", "max_tokens": 100}
    running = asyncio.create_task(complete(session, sim, **body))
    await wait_for(lambda: sim.engine.num_running == 1)
    waiting = asyncio.create_task(complete(session, sim, **body))
    await wait_for(lambda: sim.engine.num_waiting == 1)
    async with session.post(url(sim, "/v1/completions"), json=body) as resp:
        assert resp.status == 429
        assert resp.headers[SERVED_BY] == sim.name
        assert "queue" in (await resp.json())["error"]["message"]
    await running
    await waiting
    assert sim.stats.requests_rejected == 1 and sim.stats.requests_succeeded == 2


async def test_cached_prompt_has_a_shorter_ttft(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(time_factor=0.5)  # a late engine wake-up counts twice, not five times
    prompt = prompt_of("long document ", 8000)  # 2,000 tokens: 15 ms + 500 ms of prefill
    ttft = "vllm:time_to_first_token_seconds_sum"
    await complete(session, sim, prompt=prompt, max_tokens=1)
    cold = (await metrics(session, sim))[ttft]
    await complete(session, sim, prompt=prompt + " again", max_tokens=1)
    warm = (await metrics(session, sim))[ttft] - cold
    assert cold >= 0.5
    assert warm < 0.25


async def test_kv_usage_rises_while_running_and_returns_to_zero(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    # 100 tokens x 20 ms x 0.5 = 1 s of decode: the scrape lands mid-request even on a loaded CI box
    # (at 0.05 the request once finished first).
    sim = await start_sim(kv_cache_blocks=64, time_factor=0.5)
    body = {"prompt": prompt_of("usage ", 10 * BLOCK_CHARS), "max_tokens": 100}  # 160 + 100 tokens: 17 blocks
    task = asyncio.create_task(complete(session, sim, **body))
    await wait_for(lambda: sim.engine.num_running == 1)
    during = await metrics(session, sim)
    assert during["vllm:kv_cache_usage_perc"] == pytest.approx(17 / 64)
    assert during["vllm:num_requests_running"] == 1
    await task
    after = await metrics(session, sim)
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:num_requests_running"] == 0
    assert sim.engine.kv.cached_blocks >= 10  # unreferenced, but still cached for the next hit


async def test_metrics_match_what_was_served(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(max_num_seqs=3)
    shared = prompt_of("common instructions ", 6 * BLOCK_CHARS)

    async def chat(content: str, max_tokens: int, stream: bool) -> dict[str, Any]:
        request: dict[str, Any] = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
        if stream:
            request |= {"stream": True, "stream_options": {"include_usage": True}}
        async with session.post(url(sim, "/v1/chat/completions"), json=request) as resp:
            if not stream:
                body: dict[str, Any] = await resp.json()
                usage: dict[str, Any] = body["usage"]
                return usage
            usage = orjson.loads((await stream_events(resp))[-2])["usage"]
            return usage

    async def completion(prompt: str, max_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = (await complete(session, sim, prompt=prompt, max_tokens=max_tokens))["usage"]
        return usage

    concurrent = await asyncio.gather(  # some of them queue for the 3 slots
        completion(shared + "one", 5),
        completion(shared + "two", 30),
        completion("short", 1),
        chat(shared + "three", 12, stream=True),
        chat("four", 40, stream=False),
        chat(shared + "five", 3, stream=True),
    )
    usages = [*concurrent, await completion(shared + "six", 8)]  # surely after the first ones: a hit
    values = await metrics(session, sim)
    n = len(usages)
    assert values["vllm:request_success_total"] == n
    assert values["vllm:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert values["vllm:generation_tokens_total"] == sum(u["completion_tokens"] for u in usages) == 99
    assert values["vllm:prefix_cache_queries_total"] == sum(u["prompt_tokens"] for u in usages)
    assert values["vllm:prefix_cache_hits_total"] == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usages
    )
    assert usages[-1]["prompt_tokens_details"]["cached_tokens"] > 0
    assert values["vllm:time_to_first_token_seconds_count"] == n
    assert values["vllm:e2e_request_latency_seconds_count"] == n
    assert values["vllm:num_requests_running"] == values["vllm:num_requests_waiting"] == 0
    stats = sim.stats
    assert (stats.requests_succeeded, stats.prefix_cache_hits) == (n, values["vllm:prefix_cache_hits_total"])


async def test_client_disconnect_aborts_the_request(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(time_factor=0.05)
    body = {"prompt": "long answer", "max_tokens": 10_000, "stream": True}
    async with session.post(url(sim, "/v1/completions"), json=body) as resp:
        await resp.content.readline()  # the first token arrived, then hang up
        resp.close()
    await wait_for(lambda: sim.engine.num_running == 0)
    assert sim.stats.requests_aborted == 1 and sim.stats.requests_succeeded == 0
    assert sim.engine.kv.used_blocks == 0


async def test_stop_ends_open_streams(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(time_factor=0.05)
    body = {"prompt": "never finishes", "max_tokens": 10_000, "stream": True}
    async with session.post(url(sim, "/v1/completions"), json=body) as resp:
        await resp.content.readline()
        await sim.stop()
        events = await stream_events(resp)
    assert events[-1] == "[DONE]" and "error" in events[-2]


# -- command line -----------------------------------------------------------------------------------


def test_cli_runs_several_instances_until_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "epp_bench.sim",
            "--count",
            "2",
            "--base-port",
            "0",
            "--model",
            "m2",
            "--time-factor",
            "0.1",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().split() for _ in range(2)]
        assert [name for name, _ in lines] == ["sim-0", "sim-1"]

        async def check() -> None:
            async with aiohttp.ClientSession() as s:
                for name, address in lines:
                    async with s.get(f"http://{address}/v1/models") as resp:
                        assert resp.headers[SERVED_BY] == name
                        assert (await resp.json())["data"][0]["id"] == "m2"

        asyncio.run(check())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
