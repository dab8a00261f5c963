"""The load generator: sends a workload's turns to an OpenAI-compatible URL and measures each.

Streaming /v1/completions with usage; TTFT is the first chunk carrying text, inter-token latency
the mean gap between tokens after the first. Every loop is bounded by the workload's request count
and by `max_seconds`; requests still running at the deadline are cancelled and counted as errors.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from epp_bench.workloads import Turn, Workload, conversation_prompt

SERVED_BY = "x-served-by"


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    itl_s: float | None = None
    served_by: str = ""
    text: str = ""
    error: str = ""
    group: int = -1  # the shared-prefix group, or the multi-turn user: what should stick to a pod


@dataclass
class LoadResult:
    results: list[RequestResult] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # in send order, for the oracle
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        ttfts = sorted(r.ttft_s for r in ok)
        itls = [r.itl_s for r in ok if r.itl_s is not None]
        tokens = sum(r.output_tokens for r in ok)
        elapsed = self.elapsed_s or 1e-9

        def pct(p: float) -> float:
            if not ttfts:
                return float("nan")
            return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))]

        return {
            "ttft_p50_s": pct(0.50),
            "ttft_p90_s": pct(0.90),
            "ttft_p99_s": pct(0.99),
            "itl_mean_s": statistics.fmean(itls) if itls else float("nan"),
            "output_tokens_per_s": tokens / elapsed,
            "requests_per_s": len(ok) / elapsed,
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            **self.stickiness(),
        }

    def stickiness(self) -> dict[str, float]:
        """How well prefix groups (or conversations) stay on one pod: `pods_per_group`, the mean
        number of pods that served a group, and `group_on_top_pod`, the mean share of a group's
        requests served by its most-used pod (1.0: every group on one pod)."""
        by_group: dict[int, dict[str, int]] = {}
        for r in self.results:
            if r.ok and r.group >= 0 and r.served_by:
                pods = by_group.setdefault(r.group, {})
                pods[r.served_by] = pods.get(r.served_by, 0) + 1
        if not by_group:
            return {"pods_per_group": float("nan"), "group_on_top_pod": float("nan")}
        return {
            "pods_per_group": statistics.fmean(len(p) for p in by_group.values()),
            "group_on_top_pod": statistics.fmean(
                max(pods.values()) / sum(pods.values()) for pods in by_group.values()
            ),
        }


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI-style SSE stream (`data: {...}` lines), up to `data: [DONE]`."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        event: dict[str, Any] = orjson.loads(payload)
        yield event


async def send_completion(
    session: aiohttp.ClientSession, base_url: str, model: str, prompt: str, max_tokens: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage_tokens = 0
    text: list[str] = []
    try:
        async with session.post(
            f"{base_url}/v1/completions",
            data=orjson.dumps(body),
            headers={"content-type": "application/json"},
        ) as resp:
            served_by = resp.headers.get(SERVED_BY, "")
            if resp.status != 200:
                detail = (await resp.read())[:200].decode("utf-8", "replace")
                return RequestResult(False, resp.status, served_by=served_by, error=detail)
            async for event in sse_events(resp):
                usage = event.get("usage")
                if usage:
                    usage_tokens = int(usage.get("completion_tokens") or 0)
                for choice in event.get("choices") or ():
                    piece = choice.get("text") or ""
                    if piece:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
                        text.append(piece)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not first:
        return RequestResult(False, 200, served_by=served_by, error="no tokens received")
    tokens = usage_tokens or chunks
    return RequestResult(
        ok=True,
        status=200,
        ttft_s=first - started,
        e2e_s=end - started,
        output_tokens=tokens,
        itl_s=(last - first) / (tokens - 1) if tokens > 1 else None,
        served_by=served_by,
        text="".join(text),
    )


async def run_load(
    workload: Workload,
    base_url: str,
    model: str,
    max_seconds: float,
    progress: Callable[[int], object] | None = None,
    max_connections: int = 512,
) -> LoadResult:
    """Send every turn at its arrival time; bounded by the turn count and by max_seconds."""
    turns = workload.turns()
    out = LoadResult()
    timeout = aiohttp.ClientTimeout(total=max_seconds)
    connector = aiohttp.TCPConnector(limit=max_connections, force_close=False)
    loop = asyncio.get_running_loop()

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = loop.time()

        async def send(prompt: str, max_tokens: int, group: int) -> RequestResult:
            out.prompts.append(prompt)
            result = await send_completion(session, base_url, model, prompt, max_tokens)
            result.group = group
            out.results.append(result)
            if progress is not None:
                progress(1)
            return result

        async def at(offset: float) -> None:
            delay = started + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

        async def single(turn: Turn) -> None:
            await at(turn.at)
            await send(turn.prompt, turn.max_tokens, turn.group)

        async def conversation(user_turns: list[Turn]) -> None:
            history: list[tuple[str, str]] = []
            await at(user_turns[0].at)
            for turn in user_turns:
                prompt = conversation_prompt(workload.system_prompts[0], history, turn.question)
                result = await send(prompt, turn.max_tokens, turn.user)
                history.append((turn.question, result.text if result.ok else ""))

        if turns and turns[0].user >= 0:
            by_user: dict[int, list[Turn]] = {}
            for turn in turns:
                by_user.setdefault(turn.user, []).append(turn)
            tasks = [asyncio.ensure_future(conversation(ts)) for ts in by_user.values()]
        else:
            tasks = [asyncio.ensure_future(single(t)) for t in turns]
        _done, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        out.elapsed_s = loop.time() - started
        cut_short = len(turns) - len(out.results)
        out.results.extend(
            RequestResult(False, error="not finished before the deadline") for _ in range(cut_short)
        )
    return out
