"""A capacity-aware reference hit rate for the KV-events bench.

The oracle (`workloads.oracle_hit_rate`) counts every repeat of a prefix as a hit, as if one cache
of unlimited size served every request: under eviction pressure no router gets near it. This
reference replays the scenario's arrivals through the simulator's own KV cache (`KVCache`: the
scenario's blocks per pod, least recently used blocks evicted first, a prefix's tail before its
head) and routes with full knowledge of every cache, two ways, reporting the better:

- `longest-match`: each request to the pod holding the longest leading run of its blocks right
  now (ties: fewest running requests); a request no pod holds any of goes to the next pod in turn;
- `partition`: the prompts of prefix group g always to pod g mod pods (what a perfect static
  sharding of the prefixes does).

With the hit rate goes a TTFT floor: the 90th percentile of each request's own prefill time (the
simulator's fixed cost plus its uncached tokens), below which no router's TTFT p90 can go when
the caches hold only this much (queueing comes on top).

A request holds its blocks for the simulator's default prefill + decode time (one prefill step
over its uncached tokens, then a decode step per further output token), and a pod without room
finishes its earliest requests first. A `restart_at_s` empties pod 0's cache then, as
`POST /sim/restart` does. It is a reference, not a proven bound: it ignores load (no queueing
behind busy pods), event delays and tokenizer details (4 characters a token, as the workloads).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp_bench.sim.config import BLOCK_SIZE_TOKENS, SimConfig
from epp_bench.sim.kv_cache import Allocation, KVCache
from epp_bench.workloads import CHARS_PER_TOKEN, SharedPrefix, Turn, Workload, block_hashes

BLOCK_CHARS = BLOCK_SIZE_TOKENS * CHARS_PER_TOKEN


@dataclass
class _Pod:
    cache: KVCache
    # (end time, tie-breaker, allocation, the hashes its generated blocks complete)
    running: list[tuple[float, int, Allocation, list[int]]] = field(default_factory=list)

    def finish_until(self, now: float) -> None:
        while self.running and self.running[0][0] <= now:
            self.finish_first()

    def finish_first(self) -> float:
        end, _, alloc, completed = heapq.heappop(self.running)
        self.cache.release(alloc, completed)
        return end


Router = Callable[[Turn, Sequence[int], Sequence[_Pod]], int]


def _longest_match() -> Router:
    turn_counter = itertools.count()

    def route(turn: Turn, hashes: Sequence[int], pods: Sequence[_Pod]) -> int:
        matched = [pod.cache.match(hashes, len(hashes)) for pod in pods]
        best = max(matched)
        if best == 0:
            return next(turn_counter) % len(pods)
        holders = [i for i, n in enumerate(matched) if n == best]
        return min(holders, key=lambda i: len(pods[i].running))

    return route


def _partition(turn: Turn, hashes: Sequence[int], pods: Sequence[_Pod]) -> int:
    return turn.group % len(pods)


@dataclass(frozen=True)
class Replayed:
    hit_rate: float  # hit prompt tokens / prompt tokens, as the engines count them
    prefill_p90_s: float  # 90th percentile of the requests' own prefill times


def replay(
    turns: Sequence[Turn],
    pods: int,
    kv_cache_blocks: int,
    route: Router,
    restart_at_s: float | None = None,
    sim: SimConfig | None = None,
) -> Replayed:
    """The engines' hit rate and prefill times when `route` places `turns`."""
    sim = sim or SimConfig()
    state = [_Pod(KVCache(kv_cache_blocks)) for _ in range(pods)]
    fresh_ids = itertools.count(-1, -1)  # generated blocks: keys no prompt block has
    order = itertools.count()
    hit_tokens = prompt_tokens = 0
    prefills: list[float] = []
    for turn in turns:
        if restart_at_s is not None and turn.at >= restart_at_s:
            state[0] = _Pod(KVCache(kv_cache_blocks))  # its running requests fail with it
            restart_at_s = None
        for pod in state:
            pod.finish_until(turn.at)
        hashes = list(block_hashes(turn.prompt, BLOCK_CHARS))
        tokens = len(turn.prompt) // CHARS_PER_TOKEN
        pod = state[route(turn, hashes, state)]
        max_hit = (tokens - 1) // BLOCK_SIZE_TOKENS  # the engine recomputes the last prompt token
        total_blocks = -(-(tokens + turn.max_tokens) // BLOCK_SIZE_TOKENS)
        start = turn.at
        while True:
            hit = pod.cache.match(hashes, max_hit)
            alloc = pod.cache.allocate(hashes, hit, total_blocks)
            if alloc is not None:
                break
            if not pod.running:
                raise ValueError(f"a request of {total_blocks} blocks does not fit {kv_cache_blocks}")
            start = max(start, pod.finish_first())
        hit_tokens += hit * BLOCK_SIZE_TOKENS
        prompt_tokens += tokens
        uncached = tokens - hit * BLOCK_SIZE_TOKENS
        decode_step = sim.inter_token_latency_s + sim.decode_time_per_seq_s * (len(pod.running) + 1)
        prefill = sim.prefill_overhead_s + sim.prefill_time_per_token_s * uncached
        prefills.append(prefill)
        busy = prefill + decode_step * (turn.max_tokens - 1)
        completed = [next(fresh_ids) for _ in range(total_blocks)]
        heapq.heappush(pod.running, (start + busy, next(order), alloc, completed))
    prefills.sort()
    return Replayed(
        hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        prefills[int(0.9 * (len(prefills) - 1))] if prefills else 0.0,
    )


def capacity_reference(
    workload: Workload, pods: int, kv_cache_blocks: int, restart_at: float | None = None
) -> dict[str, float]:
    """The reference hit rate of each routing (`longest-match`, `partition`), the better
    (`best`) and its TTFT floor (`ttft_p90_floor_s`). `restart_at` is a fraction of the arrivals'
    span, as the bench's scenarios give it."""
    if pods < 1 or kv_cache_blocks < 1:
        raise ValueError("pods and kv_cache_blocks must be positive")
    if not isinstance(workload.spec, SharedPrefix):
        raise ValueError("the capacity reference replays shared-prefix workloads only")
    turns = workload.turns()
    restart_at_s = turns[-1].at * restart_at if turns and restart_at is not None else None
    runs = {
        "longest-match": replay(turns, pods, kv_cache_blocks, _longest_match(), restart_at_s),
        "partition": replay(turns, pods, kv_cache_blocks, _partition, restart_at_s),
    }
    best = max(runs.values(), key=lambda run: run.hit_rate)
    return {
        **{name: run.hit_rate for name, run in runs.items()},
        "best": best.hit_rate,
        "ttft_p90_floor_s": best.prefill_p90_s,
    }
