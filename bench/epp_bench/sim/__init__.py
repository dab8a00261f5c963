"""A vLLM-compatible simulator: OpenAI endpoints, vLLM metrics, a paged prefix-reusing KV cache,
max_num_seqs slots with a bounded FIFO queue, and a step-loop latency model. See engine.py for the
timing model and config.py for the defaults.

    sim = await start_simulator(SimConfig(name="pod-a", kv_cache_blocks=512, time_factor=0.1))
    ... http://127.0.0.1:{sim.port}/v1/completions ...
    print(sim.stats.prefix_cache_hits, sim.stats.hit_rate)
    await sim.stop()
"""

from epp_bench.sim.config import BLOCK_CHARS, BLOCK_SIZE_TOKENS, CHARS_PER_TOKEN, SimConfig
from epp_bench.sim.engine import SimStats
from epp_bench.sim.server import SERVED_BY, Simulator, start_simulator, start_simulators

__all__ = [
    "BLOCK_CHARS",
    "BLOCK_SIZE_TOKENS",
    "CHARS_PER_TOKEN",
    "SERVED_BY",
    "SimConfig",
    "SimStats",
    "Simulator",
    "start_simulator",
    "start_simulators",
]
