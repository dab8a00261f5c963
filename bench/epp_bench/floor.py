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

from epp_bench.sim.__main__ import parse_args as parse_sim_args
from epp_bench.sim.config import BLOCK_SIZE_TOKENS
from epp_bench.workloads import SharedPrefix, Turn, Workload, make_text

FLOOR_POLICY = "shared-cache-floor"
# The router behind the floor: epp's load scorers without a prefix scorer.
FLOOR_ROUTER = "epp-load-only"


def _shared_prefix(workload: Workload) -> SharedPrefix:
    if not isinstance(workload.spec, SharedPrefix):
        raise ValueError(f"{FLOOR_POLICY} needs the shared-prefix workload")
    return workload.spec


class FloorWorkload(Workload):
    """The workload's turns, with each group's first request's system prompt replaced by a text of
    the same length that no other request has (drawn from its own seed: the turns stay
    repeatable, and every other request, time and question is the workload's own)."""

    def turns(self) -> list[Turn]:
        spec = _shared_prefix(self)
        turns = super().turns()
        rng = random.Random(f"{FLOOR_POLICY}-{self.seed}")
        first_seen: set[int] = set()
        for turn in turns:
            if turn.group in first_seen:
                continue
            first_seen.add(turn.group)
            system = self.system_prompts[turn.group]
            turn.prompt = make_text(rng, spec.system_tokens) + turn.prompt[len(system) :]
        return turns


def floor_workload(workload: Workload) -> FloorWorkload:
    return FloorWorkload(workload.spec, workload.arrivals, workload.seed, workload.max_requests)


def floor_sim_args(sim_args: Sequence[str], workload: Workload) -> list[str]:
    """The simulators' flags with a KV cache that keeps every group's system prompt besides a full
    batch of running requests (the last --kv-cache-blocks wins; never fewer than the user's), so
    the pre-warmed prefixes stay for the whole run."""
    spec = _shared_prefix(workload)
    parsed = parse_sim_args(list(sim_args))
    prompt_tokens = spec.system_tokens + spec.question_tokens + spec.output_tokens
    per_prompt = math.ceil(prompt_tokens / BLOCK_SIZE_TOKENS)
    prefixes = spec.groups * math.ceil(spec.system_tokens / BLOCK_SIZE_TOKENS)
    blocks = max(int(parsed.kv_cache_blocks), prefixes + int(parsed.max_num_seqs) * per_prompt + 256)
    return [*sim_args, f"--kv-cache-blocks={blocks}"]


def prewarm_seconds(sim_args: Sequence[str], workload: Workload) -> float:
    """A bound on pre-warming: every system prompt prefilled on one simulator, one after another,
    at its uncached prefill rate, twice over, plus 30 s."""
    spec = _shared_prefix(workload)
    parsed = parse_sim_args(list(sim_args))
    per_prompt = (
        float(parsed.prefill_overhead_s) + spec.system_tokens * float(parsed.prefill_time_per_token_s)
    ) * float(parsed.time_factor)
    return 2 * spec.groups * per_prompt + 30.0


async def prewarm(backends: Sequence[str], model: str, prompts: Sequence[str], timeout_s: float) -> None:
    """Every prompt prefilled once on every backend (one token out), within `timeout_s` in all;
    raises RuntimeError saying which backend failed or that the bound ran out."""
    connector = aiohttp.TCPConnector(limit=0)  # every request at once: the simulators queue them
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(backend: str, prompt: str) -> None:
            body = {"model": model, "prompt": prompt, "max_tokens": 1}
            async with session.post(f"http://{backend}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{FLOOR_POLICY}: pre-warming {backend} failed: HTTP {resp.status}")
                await resp.read()

        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(one(b, p) for b in backends for p in prompts))
        except TimeoutError:
            raise RuntimeError(
                f"{FLOOR_POLICY}: pre-warming {len(prompts)} prompts on {len(backends)} simulators "
                f"took more than {timeout_s:.0f} s"
            ) from None
