"""Cost of one pick (scheduling cycle + recording the prefix) with the default config.

Run with `make bench`; results are reported in the README, never asserted as timings.
"""

from __future__ import annotations

import random

import pytest

from epp.framework import Api, CycleState, Endpoint, EndpointMetrics, InferenceRequest
from epp.framework.registry import installed_registry
from epp.scheduling.loader import DEFAULT_CONFIG, load_config


def make_endpoints(n: int, rng: random.Random) -> list[Endpoint]:
    endpoints = []
    for i in range(n):
        ep = Endpoint(f"10.0.{i // 250}.{i % 250}", 8000, f"vllm-{i}")
        ep.metrics = EndpointMetrics(
            waiting_queue_size=rng.randint(0, 20),
            running_requests=rng.randint(0, 64),
            kv_cache_usage=rng.random(),
            block_size=16,
            num_gpu_blocks=30_000,
            updated_at=1.0,
        )
        endpoints.append(ep)
    return endpoints


@pytest.mark.parametrize("n_endpoints", [8, 100])
def test_pick_with_10kb_prompt(benchmark, n_endpoints: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    scheduler = load_config(DEFAULT_CONFIG, installed_registry()).scheduler
    endpoints = make_endpoints(n_endpoints, rng)
    system_prompts = ["".join(rng.choice("abcdefgh ") for _ in range(8_000)) for _ in range(16)]

    def request(i: int) -> InferenceRequest:
        prompt = system_prompts[i % 16] + "".join(rng.choice("xyz ") for _ in range(2_000))
        return InferenceRequest(str(i), "llama", Api.COMPLETIONS, prompt, {}, {"prompt": prompt})

    # Warm the index: every system prompt has been served somewhere.
    for i in range(200):
        req = request(i)
        cycle = CycleState()
        result = scheduler.schedule(cycle, req, endpoints)
        for hook in scheduler.pre_request_hooks:
            hook.pre_request(cycle, req, result)
    requests = [request(i) for i in range(64)]
    counter = iter(range(10**9))

    def pick() -> None:
        req = requests[next(counter) % 64]
        cycle = CycleState()
        result = scheduler.schedule(cycle, req, endpoints)
        for hook in scheduler.pre_request_hooks:
            hook.pre_request(cycle, req, result)

    benchmark(pick)
