"""`python -m epp_bench pick`: the cost of one pick, in this process.

One pick is one scheduling cycle of epp's default config (prefix producer, queue, KV-cache and
prefix scorers, max-score picker) over endpoints with random metrics, held in a datastore whose
endpoint tuple is the candidates (as the director passes it when every endpoint's metrics are
fresh and Envoy sent no subset hint): what stands between the request body and the reply to
Envoy. The after-pick recording of the prompt in the prefix index runs off the reply path; it
runs between picks (so the index evolves as in service) but is not timed. Prompts are one of 16
shared system prompts (80 % of the characters) and a random question; the index is warmed by 200
earlier requests.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path
from typing import Any

from epp_bench.perf import machine, percentile, positive_ints, table, write_json

COLUMNS = (
    ("endpoints", "endpoints", ",d"),
    ("prompt_chars", "prompt chars", ",d"),
    ("p50_ms", "p50 ms", ".3f"),
    ("p99_ms", "p99 ms", ".3f"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoints", type=positive_ints, default=[8, 100, 1000], help="N or N,N,... (default 8,100,1000)"
    )
    p.add_argument(
        "--prompt-chars",
        type=positive_ints,
        default=[10_000, 100_000],
        help="C or C,C,... (default 10000,100000)",
    )
    p.add_argument("--picks", type=int, default=2000, help="timed picks per case, at most (default 2000)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time bound per case (default 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the JSON list here")


def measure(endpoints: int, prompt_chars: int, picks: int, max_seconds: float, seed: int) -> dict[str, Any]:
    from epp.datalayer.datastore import Datastore
    from epp.framework import Api, CycleState, Endpoint, EndpointMetrics, InferenceRequest
    from epp.framework.registry import installed_registry
    from epp.scheduling.loader import DEFAULT_CONFIG, load_config

    rng = random.Random(seed)
    scheduler = load_config(DEFAULT_CONFIG, installed_registry()).scheduler
    pool = []
    for i in range(endpoints):
        ep = Endpoint(f"10.{i // 62500}.{i // 250 % 250}.{i % 250}", 8000, f"vllm-{i}")
        ep.metrics = EndpointMetrics(
            waiting_queue_size=rng.randint(0, 20),
            running_requests=rng.randint(0, 64),
            kv_cache_usage=rng.random(),
            block_size=16,
            num_gpu_blocks=30_000,
            updated_at=time.monotonic(),
        )
        pool.append(ep)
    store = Datastore()
    store.replace_all(pool)
    candidates = store.endpoints()
    system_chars = prompt_chars * 4 // 5
    systems = ["".join(rng.choice("abcdefgh ") for _ in range(system_chars)) for _ in range(16)]

    def request(i: int) -> Any:
        prompt = systems[i % 16] + "".join(rng.choice("xyz ") for _ in range(prompt_chars - system_chars))
        return InferenceRequest(str(i), "llama", Api.COMPLETIONS, prompt, {}, {"prompt": prompt})

    def pick(req: Any) -> float:
        cycle = CycleState()
        started = time.perf_counter()
        result = scheduler.schedule(cycle, req, candidates)
        took = time.perf_counter() - started
        for hook in scheduler.pre_request_hooks:  # off the reply path in epp: not timed
            hook.pre_request(cycle, req, result)
        return took

    for i in range(200):
        pick(request(i))
    requests = [request(200 + i) for i in range(64)]
    times: list[float] = []
    gc.collect()
    deadline = time.monotonic() + max_seconds
    while len(times) < picks and time.monotonic() < deadline:
        times.append(pick(requests[len(times) % 64]))
    times.sort()
    return {
        "endpoints": endpoints,
        "prompt_chars": prompt_chars,
        "p50_ms": round(percentile(times, 0.5) * 1e3, 4),
        "p99_ms": round(percentile(times, 0.99) * 1e3, 4),
    }


def main(args: argparse.Namespace) -> int:
    rows = [
        measure(n, c, args.picks, args.max_seconds, args.seed)
        for n in args.endpoints
        for c in args.prompt_chars
    ]
    print(table(rows, COLUMNS))
    print(f"(one scheduling cycle of the default config; {machine()})")
    write_json(args.out, rows)
    return 0
