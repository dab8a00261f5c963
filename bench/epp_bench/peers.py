"""The peer routers the bench compares epp against, each an HTTP router in front of the same
simulators (no Envoy): how each is started, and how the bench knows it is ready.

| policy | router |
|---|---|
| `vllm-router` | vllm-router `--policy cache_aware`, its default thresholds |
| `vllm-router-tuned` | vllm-router `--policy cache_aware`, balance thresholds tuned for prefix-heavy load |
| `sglang-router` | sglang-router `launch --policy cache_aware`, its default thresholds |
| `power-of-two` | vllm-router `--policy power_of_two`: two random workers, the less loaded one |

Both routers are Rust binaries from PyPI, installed into `.venv-tools` by `make tools` (versions in
the Makefile). vllm-router's cache_aware asks every worker for the prompt's token ids
(`/v1/completions/render` or `/v1/chat/completions/render`, else `/tokenize`; a worker that has
not answered within about a second is left out) and matches them against a per-worker prefix tree;
without token ids it routes by load alone. sglang-router's cache_aware matches the request text.
Both route to the worker holding the longest match when it covers more than `--cache-threshold` of
the prompt, else to the least-loaded worker, and balance by load alone while the in-flight counts
are imbalanced (max - min > `--balance-abs-threshold` and max > min x `--balance-rel-threshold`).
docs/benchmarks.md says why the tuned thresholds are what they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from epp_bench.gateway import REPO_ROOT, GatewayError, free_port, terminate

# vllm-router cache_aware tuned for prefix-heavy load (the demo's shared-prefix workload): let load
# override the cache only when one worker has 256 more requests in flight than the least loaded and
# 4x its count (defaults 64 and 1.5), since there a cache miss (a 1,536-token prefill) costs more
# than queueing behind a pod's own group. A sweep of lower thresholds lost hit rate and TTFT at every
# rate tried (docs/benchmarks.md). The cache threshold stays at its default, 0.3: a request matches
# ~0.96 of its prompt on its group's worker and ~0 elsewhere, so anything in between routes alike.
TUNED_BALANCE_ABS_THRESHOLD = "256"
TUNED_BALANCE_REL_THRESHOLD = "4.0"
VLLM_ROUTER_TUNED_ARGS: tuple[str, ...] = (
    "--balance-abs-threshold", TUNED_BALANCE_ABS_THRESHOLD,
    "--balance-rel-threshold", TUNED_BALANCE_REL_THRESHOLD,
)  # fmt: skip


def tools_bin(name: str) -> Path:
    """A binary from .venv-tools (Envoy's siblings: vllm-router, sglang-router), or PATH."""
    candidate = REPO_ROOT / ".venv-tools" / "bin" / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise GatewayError(f"{name} not found: run `make tools`")
    return Path(found)


@dataclass(frozen=True)
class Peer:
    """One peer policy: a router binary, its arguments, and how to tell it is ready."""

    name: str
    binary: str
    policy: str
    subcommand: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    log_level: str = "warning"
    # GET path polled until it answers 200 and, if set, `ready_when(json)` holds for the worker count.
    ready_path: str = "/v1/models"
    ready_when: Callable[[object, int], bool] | None = None

    def argv(self, port: int, metrics_port: int, backends: Sequence[str]) -> list[str]:
        """The full command line for this peer on 127.0.0.1:port over `backends` (host:port)."""
        return [
            str(tools_bin(self.binary)), *self.subcommand,
            "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *[f"http://{b}" for b in backends],
            "--policy", self.policy, *self.extra,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--log-level", self.log_level,
            "--worker-startup-timeout-secs", "30", "--worker-startup-check-interval", "1",
        ]  # fmt: skip


def _all_workers_healthy(doc: object, workers: int) -> bool:
    """sglang-router's /readiness: it answers before its workers are registered (they are added
    in the background), so wait until all of them are healthy."""
    return isinstance(doc, dict) and doc.get("healthy_workers") == workers


PEERS: dict[str, Peer] = {
    "vllm-router": Peer("vllm-router", "vllm-router", "cache_aware"),
    "vllm-router-tuned": Peer(
        "vllm-router-tuned", "vllm-router", "cache_aware", extra=VLLM_ROUTER_TUNED_ARGS
    ),
    "sglang-router": Peer(
        "sglang-router",
        "sglang-router",
        "cache_aware",
        subcommand=("launch",),
        log_level="warn",
        ready_path="/readiness",
        ready_when=_all_workers_healthy,
    ),
    "power-of-two": Peer("power-of-two", "vllm-router", "power_of_two"),
}


@contextlib.asynccontextmanager
async def peer_router(
    peer: Peer, backends: Sequence[str], startup_timeout_s: float = 60.0, log_path: Path | None = None
) -> AsyncIterator[str]:
    """Start `peer` over the backends on loopback free ports; yields its base URL once it routes to
    all of them, and stops it on exit. Its output goes to `log_path` (default: discarded)."""
    port, metrics_port = free_port(), free_port()
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 (closed below)
    proc = await asyncio.create_subprocess_exec(
        *peer.argv(port, metrics_port, backends),
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(REPO_ROOT),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not await _ready(session, url, peer, len(backends)):
                if proc.returncode is not None:
                    raise GatewayError(f"{peer.name} ({peer.binary}) exited during start-up")
                if time.monotonic() > deadline:
                    raise GatewayError(f"{peer.name} ({peer.binary}) not ready in {startup_timeout_s:.0f} s")
                await asyncio.sleep(0.2)
        yield url
    finally:
        await terminate(proc, 10)
        log.close()


async def _ready(session: aiohttp.ClientSession, url: str, peer: Peer, workers: int) -> bool:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        async with session.get(url + peer.ready_path) as resp:
            if resp.status != 200:
                return False
            return peer.ready_when is None or peer.ready_when(orjson.loads(await resp.read()), workers)
    return False
