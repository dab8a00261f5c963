"""The shared-cache floor: a reference row for a shared-prefix run, not a router.

What could any router reach on this rung? Every router pays one cold prefill per prefix group (its
first request is cold wherever it goes); a perfect router would pay nothing more and could still
send each later request to whichever pod is least loaded, as if every pod held every prefix. The
floor runs exactly that: before the load, each simulator is given every group's system prompt (and
room to keep them all), each group's first request carries instead a prefix of the same length
that no pod holds, and epp routes by load alone (`epp-load-only`). No real router gets this
flexibility for free: splitting a group over pods costs a cold prefill each time, so the floor's
TTFT p90 is what a router can hope to approach, not beat. It is an estimate, not a proof: the
floor's own balancer is epp's load scorers, not the best balancing there is, so on one draw a
real router can come close to it or, by luck, under it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

import aiohttp

from epp_bench.sim.config import BLOCK_SIZE_TOKENS
from epp_bench.workloads import SharedPrefix, Turn, Workload, make_text

FLOOR_POLICY = "shared-cache-floor"
# The router behind the floor: epp's load scorers without a prefix scorer.
FLOOR_ROUTER = "epp-load-only"


class FloorWorkload(Workload):
    """The workload's turns, with each group's first request's system prompt replaced by a text of
    the same length that no other request has (drawn from its own seed: the turns stay
    repeatable, and every other request, time and question is the workload's own)."""

    def turns(self) -> list[Turn]:
        if not isinstance(self.spec, SharedPrefix):
            raise ValueError(f"{FLOOR_POLICY} needs the shared-prefix workload")
        turns = super().turns()
        rng = random.Random(f"{FLOOR_POLICY}-{self.seed}")
        first_seen: set[int] = set()
        for turn in turns:
            if turn.group in first_seen:
                continue
            first_seen.add(turn.group)
            system = self.system_prompts[turn.group]
            turn.prompt = make_text(rng, self.spec.system_tokens) + turn.prompt[len(system) :]
        return turns


def floor_workload(workload: Workload) -> FloorWorkload:
    return FloorWorkload(workload.spec, workload.arrivals, workload.seed, workload.max_requests)


def floor_sim_args(sim_args: Sequence[str], workload: Workload) -> list[str]:
    """The simulators' flags with a KV cache that keeps every group's system prompt besides the
    running requests' blocks (the last --kv-cache-blocks wins), so pre-warmed prefixes stay."""
    spec = workload.spec
    if not isinstance(spec, SharedPrefix):
        raise ValueError(f"{FLOOR_POLICY} needs the shared-prefix workload")
    prompt_tokens = spec.system_tokens + spec.question_tokens + spec.output_tokens
    per_prompt = math.ceil(prompt_tokens / BLOCK_SIZE_TOKENS)
    blocks = 2 * spec.groups * per_prompt + 256
    return [*sim_args, f"--kv-cache-blocks={blocks}"]


async def prewarm(backends: Sequence[str], model: str, prompts: Sequence[str], timeout_s: float) -> None:
    """Every prompt prefilled once on every backend (one token out); raises if one fails."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(backend: str, prompt: str) -> None:
            body = {"model": model, "prompt": prompt, "max_tokens": 1}
            async with session.post(f"http://{backend}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"pre-warming {backend} failed: HTTP {resp.status}")
                await resp.read()

        await asyncio.gather(*(one(b, p) for b in backends for p in prompts))
