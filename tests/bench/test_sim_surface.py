"""The simulator's vLLM surface beyond generation, over real HTTP on loopback: /tokenize, /detokenize,
the render endpoints, /version, /ping and the prefix-cache counters under both names; and the
tokenizer behind them (4 bytes a token, prefix-consistent ids)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from epp_bench.sim import BLOCK_CHARS, SERVED_BY, Simulator
from epp_bench.sim.text import chat_prompt, count_tokens
from epp_bench.sim.tokenizer import decode, encode, ids_prompt
from tests.bench.test_simulator import complete, metrics, url
from tests.conftest import StartSim

pytestmark = pytest.mark.timeout(30)

MODEL = "sim-model"
SYSTEM = "You are a careful assistant. " * 40  # 1,160 bytes: 18 whole KV blocks
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a KV cache?"}]


async def post(session: aiohttp.ClientSession, sim: Simulator, path: str, body: dict[str, Any]) -> Any:
    async with session.post(url(sim, path), json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers[SERVED_BY] == sim.name
        assert resp.content_type == "application/json"
        return await resp.json()


# -- the tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "a", "abcd", "abcde", "héllo wörld ✓ 日本語", SYSTEM])
def test_ids_count_like_the_simulator_and_decode_exactly(text: str) -> None:
    ids = encode(text)
    assert len(ids) == count_tokens(text.encode())
    assert all(0 <= i < 2**32 for i in ids)
    assert decode(ids) == text
    # As a prompt, ids stand for the same bytes (padded to 4 an id), so the same tokens and blocks.
    assert ids_prompt(ids).encode()[: len(text.encode())] == text.encode()
    assert count_tokens(ids_prompt(ids).encode()) == len(ids)


def test_ids_are_prefix_consistent_and_stable() -> None:
    a, b = SYSTEM + "first question", SYSTEM + "second, longer question"
    ids_a, ids_b = encode(a), encode(b)
    shared = len(SYSTEM.encode()) // 4
    assert ids_a[:shared] == ids_b[:shared]
    assert ids_a[shared + 1 :] != ids_b[shared + 1 : len(ids_a)]
    assert encode(a) == ids_a  # no state, no randomness
    assert encode("wxyz") == [int.from_bytes(b"wxyz", "big")]


def test_foreign_ids_still_count_one_token_each() -> None:
    ids = [0xFF, 0xFFFE, 2**40 + 7]  # not UTF-8 as bytes: 4 hex digits an id instead
    assert count_tokens(ids_prompt(ids).encode()) == 3


# -- /tokenize and /detokenize -----------------------------------------------------------------------


async def test_tokenize_a_prompt(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(kv_cache_blocks=100)
    body = await post(session, sim, "/tokenize", {"model": MODEL, "prompt": "hello world"})
    assert body == {"count": 3, "max_model_len": 1600, "tokens": encode("hello world"), "token_strs": None}
    body = await post(session, sim, "/tokenize", {"prompt": "hello world", "return_token_strs": True})
    assert body["token_strs"] == ["hell", "o wo", "rld"]


async def test_tokenize_chat_messages_through_the_template(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    body = await post(session, sim, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert body["tokens"] == encode(chat_prompt(MESSAGES))
    assert body["count"] == len(body["tokens"])
    bare = await post(session, sim, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert decode(bare["tokens"]) == chat_prompt(MESSAGES, add_generation_prompt=False)
    assert decode(body["tokens"]) == decode(bare["tokens"]) + "<|assistant|>\n"
    open_ = {"messages": MESSAGES, "add_generation_prompt": False, "continue_final_message": True}
    assert decode((await post(session, sim, "/tokenize", open_))["tokens"]).endswith("KV cache?")


async def test_detokenize_round_trips(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    text = "héllo wörld, the KV cache ✓"
    tokens = (await post(session, sim, "/tokenize", {"prompt": text}))["tokens"]
    assert await post(session, sim, "/detokenize", {"model": MODEL, "tokens": tokens}) == {"prompt": text}
    assert await post(session, sim, "/detokenize", {"tokens": []}) == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/tokenize", {"model": "nope", "prompt": "hi"}, 404),
        ("/tokenize", {"prompt": 5}, 400),
        ("/tokenize", {}, 400),
        ("/tokenize", {"messages": []}, 400),
        (
            "/tokenize",
            {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": 1},
            400,
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True},
            400,
        ),
        ("/detokenize", {"tokens": [1, -1]}, 400),
        ("/detokenize", {"tokens": "abc"}, 400),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404),
        ("/v1/completions/render", {"prompt": ""}, 400),
        ("/v1/completions/render", {"prompt": [1, "a"]}, 400),
        ("/v1/completions/render", {"model": "nope", "prompt": "hi"}, 404),
        ("/v1/completions/render", {"prompt": "hi", "max_tokens": 0}, 400),
        ("/v1/chat/completions/render", {"messages": "hi"}, 400),
        ("/v1/chat/completions/render", {"model": "nope", "messages": MESSAGES}, 404),
    ],
)
async def test_errors_have_vllm_shape(
    start_sim: StartSim, session: aiohttp.ClientSession, path: str, body: dict[str, Any], status: int
) -> None:
    sim = await start_sim()
    async with session.post(url(sim, path), json=body) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert error["code"] == status and error["message"]
    assert sim.stats.requests_received == 0


# -- render ------------------------------------------------------------------------------------------


def assert_generate_request(req: dict[str, Any], prefix: str, token_ids: list[int], max_tokens: int) -> None:
    """vLLM's GenerateRequest, as its render endpoints serialize it."""
    assert set(req) == {
        "request_id", "token_ids", "features", "sampling_params", "model", "stream", "stream_options",
        "cache_salt", "priority", "kv_transfer_params",
    }  # fmt: skip
    assert req["request_id"].startswith(prefix)
    assert req["token_ids"] == token_ids
    assert req["features"] is None and req["kv_transfer_params"] is None
    assert req["sampling_params"]["max_tokens"] == max_tokens
    assert req["priority"] == 0


async def test_render_completion(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(default_max_tokens=16)
    [one] = await post(session, sim, "/v1/completions/render", {"model": MODEL, "prompt": SYSTEM})
    assert_generate_request(one, "cmpl-", encode(SYSTEM), 16)
    assert one["model"] == MODEL and one["stream"] is False and one["stream_options"] is None
    batch = await post(
        session,
        sim,
        "/v1/completions/render",
        {"prompt": ["abcd", [7, 8, 9]], "max_tokens": 5, "temperature": 0.0, "stop": "\n", "stream": True},
    )
    assert [r["token_ids"] for r in batch] == [encode("abcd"), [7, 8, 9]]
    params = batch[0]["sampling_params"]
    assert (params["max_tokens"], params["temperature"], params["stop"]) == (5, 0.0, ["\n"])
    assert batch[0]["stream"] is True and batch[0]["model"] is None
    assert batch[0]["request_id"] != batch[1]["request_id"]


async def test_render_chat_matches_tokenize_and_generation(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim(kv_cache_blocks=100)
    rendered = await post(
        session, sim, "/v1/chat/completions/render", {"model": MODEL, "messages": MESSAGES, "max_tokens": 7}
    )
    tokenized = await post(session, sim, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert_generate_request(rendered, "chatcmpl-", tokenized["tokens"], 7)
    # The chat completion itself sees exactly the rendered prompt: same token count.
    async with session.post(
        url(sim, "/v1/chat/completions"), json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    ) as resp:
        usage = (await resp.json())["usage"]
    assert usage["prompt_tokens"] == len(rendered["token_ids"])
    # Without max_tokens, the simulator's default, capped at what is left of max_model_len.
    near_full = {"messages": [{"role": "user", "content": "x" * (4 * 1600 - 40)}]}
    capped = await post(session, sim, "/v1/chat/completions/render", near_full)
    assert capped["sampling_params"]["max_tokens"] == 1600 - len(capped["token_ids"])


async def test_token_id_prompts_meet_the_text_cache(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    """A prompt sent as the ids /tokenize gave for a text hits the blocks that text cached."""
    sim = await start_sim()
    await complete(session, sim, prompt=SYSTEM + "one", max_tokens=1)
    ids = (await post(session, sim, "/tokenize", {"prompt": SYSTEM + "two"}))["tokens"]
    body = await complete(session, sim, prompt=ids, max_tokens=1)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == len(SYSTEM) // BLOCK_CHARS * 16


# -- /version, /ping, counters -----------------------------------------------------------------------


async def test_version_and_ping(start_sim: StartSim, session: aiohttp.ClientSession) -> None:
    sim = await start_sim(vllm_version="0.11.0")
    async with session.get(url(sim, "/version")) as resp:
        assert resp.status == 200 and await resp.json() == {"version": "0.11.0"}
    for method in ("GET", "POST"):
        async with session.request(method, url(sim, "/ping")) as resp:
            assert resp.status == 200 and resp.headers[SERVED_BY] == sim.name


async def test_prefix_cache_counters_under_both_names(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    first = await complete(session, sim, prompt=SYSTEM + "one", max_tokens=1)
    second = await complete(session, sim, prompt=SYSTEM + "two", max_tokens=1)
    values = await metrics(session, sim)
    queries = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    hits = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert hits > 0
    for name in ("vllm:prefix_cache", "vllm:gpu_prefix_cache"):  # vLLM's current and older names, in tokens
        assert values[f"{name}_queries_total"] == queries
        assert values[f"{name}_hits_total"] == hits


async def test_inter_token_latency_is_observed_once_per_gap(
    start_sim: StartSim, session: aiohttp.ClientSession
) -> None:
    sim = await start_sim()
    await complete(session, sim, prompt="a short prompt", max_tokens=8)
    await complete(session, sim, prompt="another prompt", max_tokens=1)  # no gap: nothing observed
    values = await metrics(session, sim)
    assert values["vllm:inter_token_latency_seconds_count"] == 7
    # The gaps are the simulator's decode steps, in unscaled seconds (20 ms at batch 1).
    assert 0.015 < values["vllm:inter_token_latency_seconds_sum"] / 7 < 0.2
