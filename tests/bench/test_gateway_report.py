"""`python -m epp_bench report` against real gateways: simulators behind real Envoy and epp, and
behind Envoy round-robin; the counters read from the pods, from a Prometheus HTTP API, and from
an InferencePool's pods in a loopback Kubernetes API.

The Prometheus server here is a small loopback stand-in, written for these tests: it speaks the
Prometheus HTTP API's JSON format for instant queries (`GET /api/v1/query`) of the one shape the
report sends, `sum by (pod, instance) (METRIC{label="value",...})`, and answers it by scraping the
simulators' real /metrics pages (prometheus-client's exposition) at query time. Any other query
gets Prometheus' error document (`errorType: bad_data`)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.__main__ import main as epp_bench_main
from epp_bench.cache_counters import (
    CounterError,
    Counters,
    PodsSource,
    PrometheusSource,
    counters_from_text,
    metrics_url,
    pool_pods,
)
from epp_bench.gateway import EnvoyGateway, EppProcess
from epp_bench.gateway_report import (
    ReportConfig,
    ReportError,
    Sample,
    make_sessions,
    render,
    run_report,
    stages,
    stickiness,
)
from epp_bench.sim import Simulator
from tests.conftest import StartSim
from tests.support.kube_api import PODS, POOLS_V1, POOLS_V1ALPHA2, KubeApiServer, inference_pool, pod

# Prefill of a missed prompt costs real time (0.25 ms/token x 0.1), so hits show in TTFT too.
SIM_TIME_FACTOR = 0.1
REPO = Path(__file__).resolve().parents[2]
# Short prompts and answers: each test stays within a few seconds of traffic.
SMALL = ReportConfig(gateway="", system_tokens=256, session_tokens=768, question_tokens=16, output_tokens=8)


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    yield server
    await server.stop()


async def sims(start_sim: StartSim, count: int) -> list[Simulator]:
    return [await start_sim() for _ in range(count)]


async def cli(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_bench", "report", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- the acceptance: epp sticks and hits more than round-robin -------------------------------------


async def test_epp_is_stickier_and_hits_more_than_round_robin(start_sim: StartSim, tmp_path: Path) -> None:
    """The same report, through Envoy + epp (the pod from epp's response header) and through
    Envoy round-robin (the pod from counter deltas, via the command line), each on 4 fresh
    simulators: 6 sessions x 4 turns, a 1,2,3 ramp."""
    epp_sims = await sims(start_sim, 4)
    addresses = [s.address for s in epp_sims]
    source = PodsSource.from_list(addresses)
    cfg = replace(SMALL, sessions=6, turns=4, warmup=4, ramp=(1, 2, 3))
    async with (
        EppProcess(addresses, extra_args=["--emit-served-endpoint-header", "--log-level", "warning"]) as epp,
        EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gw,
    ):
        epp_doc = await run_report(replace(cfg, gateway=gw.url), source)
    await source.close()

    rr_sims = await sims(start_sim, 4)
    pods = ",".join(s.address for s in rr_sims)
    async with EnvoyGateway("round-robin", backends=[s.address for s in rr_sims]) as gw:
        code, out, err = await cli(
            "--gateway", gw.url, "--pods", pods, "--sessions", "6", "--turns", "4", "--ramp", "1,2,3",
            "--system-tokens", "256", "--session-tokens", "768", "--question-tokens", "16",
            "--output-tokens", "8", "--out-dir", str(tmp_path), "--quiet",
        )  # fmt: skip
    assert code == 0, err
    rr_doc = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "prefix-cache hit rate (delta)" in out and "stickiness" in out

    for doc in (epp_doc, rr_doc):
        assert doc["errors"] == 0 and doc["requests"] == 24
        assert doc["stickiness"]["sessions_measured"] == 6
        for figure in ("ttft_s", "tpot_s", "e2e_s"):
            assert 0 < doc[figure]["p50"] <= doc[figure]["p90"] <= doc[figure]["p99"]
    assert epp_doc["attribution"] == "header" and not epp_doc["serial"]
    assert [s["concurrency"] for s in epp_doc["stages"]] == [1, 2, 3]
    assert rr_doc["attribution"] == "counters" and rr_doc["serial"]
    # Round-robin, one request at a time: every pod serves 6, no two turns of a session share one.
    assert {p: v["requests"] for p, v in rr_doc["pods"].items()} == dict.fromkeys(pods.split(","), 6)
    assert all(v["stickiness"] == 0.25 for v in rr_doc["sessions"].values())
    # epp's header names the simulators (mapped to the --pods names).
    assert {p for p, v in epp_doc["pods"].items() if v["requests"]} <= set(addresses)
    assert epp_doc["stickiness"]["mean"] >= 0.9 > rr_doc["stickiness"]["mean"]
    assert epp_doc["hit_rate"] > rr_doc["hit_rate"] + 0.2, (epp_doc["hit_rate"], rr_doc["hit_rate"])


# -- counters from Prometheus' HTTP API --------------------------------------------------------------

_QUERY = re.compile(r"^sum by \(pod, instance\) \(([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\)$")
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*=\s*"([^"]*)"\s*,?')


class PrometheusApi:
    """The loopback Prometheus HTTP API of the module docstring. `targets`: pod -> address, with
    `namespace` as a target label."""

    def __init__(self, targets: dict[str, str], namespace: str = "llm") -> None:
        self.targets = targets
        self.namespace = namespace
        self.queries: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> PrometheusApi:
        app = web.Application()
        app.router.add_get("/api/v1/query", self._query)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _error(message: str) -> web.Response:
        return web.json_response({"status": "error", "errorType": "bad_data", "error": message}, status=400)

    async def _query(self, request: web.Request) -> web.Response:
        expr = request.query.get("query", "")
        self.queries.append(expr)
        m = _QUERY.match(expr)
        if not m:
            return self._error(f"this test server answers only sum by (pod, instance) (M{{...}}): {expr!r}")
        name, selector = m.group(1), (m.group(2) or "{}")[1:-1]
        wanted = dict(_MATCHER.findall(selector))
        result = []
        async with aiohttp.ClientSession() as http:
            for pod_name, address in self.targets.items():
                labels = {"pod": pod_name, "instance": address, "namespace": self.namespace}
                if any(labels.get(k) != v for k, v in wanted.items()):
                    continue
                async with http.get(f"http://{address}/metrics") as resp:
                    text = await resp.text()
                values = [
                    s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                    if s.name == name
                ]
                if values:  # no series, no element (as Prometheus)
                    result.append(
                        {
                            "metric": {"pod": pod_name, "instance": address},
                            "value": [time.time(), str(sum(values))],
                        }
                    )
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})


async def test_counters_from_a_prometheus_http_api(start_sim: StartSim) -> None:
    two = await sims(start_sim, 2)
    prom = await PrometheusApi({f"vllm-{i}": s.address for i, s in enumerate(two)}).start()
    try:
        source = PrometheusSource(prom.url, 'namespace="llm"')
        async with EnvoyGateway("round-robin", backends=[s.address for s in two]) as gw:
            cfg = replace(SMALL, gateway=gw.url, sessions=2, turns=3, warmup=2, ramp=(2,))
            doc = await run_report(cfg, source)
        assert prom.queries[0] == 'sum by (pod, instance) (vllm:prefix_cache_hits_total{namespace="llm"})'
        assert set(doc["pods"]) == {"vllm-0", "vllm-1"}
        queried = sum(s.stats.prefix_cache_queries for s in two)
        # The delta covers the ramp: all queries but the warm-up's.
        assert 0 < doc["prefix_cache_queries"] < queried
        assert 0 < doc["hit_rate"] < 1
        # No header, counters only as fresh as Prometheus: the pods of requests are unknown.
        assert doc["attribution"] == "none" and doc["stickiness"]["mean"] is None
        assert "unknown" in render(doc)

        # Through epp, with its header: IP:port mapped to the pod names through `instance`.
        async with (
            EppProcess([s.address for s in two], extra_args=["--emit-served-endpoint-header"]) as epp,
            EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gw,
        ):
            doc = await run_report(replace(cfg, gateway=gw.url), source)
        assert doc["attribution"] == "header" and doc["stickiness"]["mean"] == 1.0
        assert sum(v["requests"] for v in doc["pods"].values()) == 6
        assert set(doc["pods"]) == {"vllm-0", "vllm-1"}

        with pytest.raises(CounterError, match="no series"):
            await PrometheusSource(prom.url, 'namespace="elsewhere"').read()
        prom.targets.clear()
        with pytest.raises(CounterError, match="no series"):
            await PrometheusSource(prom.url).read()
        async with aiohttp.ClientSession() as http:
            with pytest.raises(CounterError, match="refused"):
                await PrometheusSource(prom.url)._query(http, "up")
    finally:
        await prom.stop()


# -- the pods of an InferencePool ------------------------------------------------------------------


async def test_pool_pods_from_kubernetes_then_counter_attribution(
    api: KubeApiServer, kubeconfig: Path, start_sim: StartSim, tmp_path: Path
) -> None:
    """A v1 pool with two target ports on one pod (two simulators on 127.0.0.1), a pod that is
    not ready and one outside the selector; the command reads it with --pool."""
    two = await sims(start_sim, 2)
    ports = [s.port for s in two]
    labels = {"app": "vllm"}
    api.put(POOLS_V1, inference_pool("pool", labels, ports, namespace="llm"))
    api.put(PODS, pod("vllm-a", "127.0.0.1", labels, namespace="llm"))
    api.put(PODS, pod("vllm-b", "127.0.0.9", labels, namespace="llm", ready=False))
    api.put(PODS, pod("other", "127.0.0.8", {"app": "x"}, namespace="llm"))
    found = await pool_pods("pool", "llm", kubeconfig)
    assert found == {f"vllm-a:{p}": f"127.0.0.1:{p}" for p in ports}

    async with EnvoyGateway("round-robin", backends=[s.address for s in two]) as gw:
        code, out, err = await cli(
            "--gateway", gw.url, "--pool", "pool", "--namespace", "llm", "--kubeconfig", str(kubeconfig),
            "--sessions", "2", "--turns", "2", "--warmup", "1", "--ramp", "2", "--api", "completions",
            "--system-tokens", "64", "--session-tokens", "256", "--out-dir", str(tmp_path), "--quiet",
        )  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["attribution"] == "counters"
    assert {p: v["requests"] for p, v in doc["pods"].items()} == {f"vllm-a:{p}": 2 for p in ports}
    assert "vllm-a:" in out

    # The older API group, one port: found when the v1 one is not there.
    api.delete(POOLS_V1, "pool", namespace="llm")
    api.put(
        POOLS_V1ALPHA2, inference_pool("pool", labels, ports[:1], namespace="llm", resource=POOLS_V1ALPHA2)
    )
    assert await pool_pods("pool", "llm", kubeconfig) == {"vllm-a": f"127.0.0.1:{ports[0]}"}
    with pytest.raises(CounterError, match="not found"):
        await pool_pods("missing", "llm", kubeconfig)
    api.put(POOLS_V1, inference_pool("empty", {"app": "none"}, [8000], namespace="llm"))
    with pytest.raises(CounterError, match="no ready pod"):
        await pool_pods("empty", "llm", kubeconfig)


# -- bad input gets a clear error ------------------------------------------------------------------


async def test_clear_errors(start_sim: StartSim, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (sim,) = await sims(start_sim, 1)
    gateway = f"http://{sim.address}"  # straight at a simulator: any OpenAI-compatible server works

    async def run(*args: str) -> tuple[int, str]:
        """The command in-process (in a thread: it runs its own event loop): (exit code, stderr)."""
        argv = ["report", *args, "--out-dir", str(tmp_path)]
        try:
            code = await asyncio.to_thread(epp_bench_main, argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        return code, capsys.readouterr().err

    code, err = await run("--gateway", gateway, "--pods", sim.address, "--ramp", "0,x")
    assert code == 2 and "--ramp" in err
    code, err = await run("--gateway", gateway)
    assert code == 2 and "--pods" in err  # one counter source is required
    code, err = await run("--gateway", gateway, "--pods", sim.address, "--model", "nope")
    assert code == 2 and "HTTP 404" in err and "--model" in err
    code, err = await run("--gateway", "http://127.0.0.1:9", "--pods", sim.address)
    assert code == 2 and "every warm-up request" in err and "127.0.0.1:9" in err
    code, err = await run("--gateway", gateway, "--pods", sim.address, "--sessions", "2")
    assert code == 2 and "3 stages for 2 sessions" in err
    code, err = await run("--gateway", gateway, "--pods", f"{sim.address}/v1/models")
    assert code == 2 and "not a Prometheus text page" in err
    code, err = await run("--gateway", gateway, "--pods", "127.0.0.1:9")
    assert code == 2 and "cannot read http://127.0.0.1:9/metrics" in err
    code, err = await run("--gateway", gateway, "--prometheus", "ftp://x")
    assert code == 2 and "--prometheus expects" in err
    assert not (tmp_path / "report.json").exists()
    assert sim.stats.requests_succeeded == 0, "nothing is sent before the counters are readable"
    cfg = replace(SMALL, gateway=gateway, sessions=1, turns=1, ramp=(1,), attribution="counters")
    with pytest.raises(ReportError, match="needs live counters"):
        await run_report(cfg, PrometheusSource("http://127.0.0.1:9"))


def test_counter_pages_the_old_names_and_resets() -> None:
    new_and_old = """\
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 30.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 10.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 60.0
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 40.0
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{model_name="m"} 160.0
"""
    # Engines summed; both generations of names present: counted once.
    assert counters_from_text(new_and_old, "pod") == Counters(40.0, 160.0)
    old_only = "\n".join(line for line in new_and_old.splitlines() if "gpu_" in line) + "\n"
    assert counters_from_text(old_only, "pod") == Counters(40.0, 160.0)
    with pytest.raises(CounterError, match="neither"):
        counters_from_text("# TYPE up gauge\nup 1\n", "pod")
    # A pod that restarted counts from zero, as Prometheus' increase() does.
    assert Counters(5, 20).minus(Counters(40, 160)) == Counters(5, 20)
    assert Counters(50, 200).minus(Counters(40, 160)) == Counters(10, 40)
    assert metrics_url("10.0.0.1:8000") == "http://10.0.0.1:8000/metrics"
    assert metrics_url("https://pod:8443/custom") == "https://pod:8443/custom"
    with pytest.raises(ValueError):
        metrics_url("ftp://x")


def test_stickiness_and_stages() -> None:
    def s(session: str, pod: str, ok: bool = True) -> Sample:
        return Sample(session, 0, 0, ok=ok, pod=pod)

    got = stickiness(
        [s("a", "p1"), s("a", "p1"), s("a", "p2"), s("b", "p3"), s("b", ""), s("c", "p1", ok=False)]
    )
    assert got["a"] == {"requests": 3, "pods": 2, "top_pod": "p1", "stickiness": 2 / 3}
    assert got["b"]["stickiness"] == 1.0 and got["b"]["requests"] == 1  # unknown pods are left out
    assert "c" not in got  # no successful request
    sessions = make_sessions(SMALL, "t", 7, "s")
    ids = [[s.id for s in group] for group in stages(sessions, (1, 2, 4))]
    assert ids == [["t-s0", "t-s1"], ["t-s2", "t-s3"], ["t-s4", "t-s5", "t-s6"]]
    # One shared system prompt naming the test; each session's own context naming the session.
    assert len({s.system for s in sessions}) == 1 and sessions[0].system.startswith("[test t]")
    assert sessions[3].context.startswith("\n[session t-s3]")
    assert make_sessions(SMALL, "u", 1, "s")[0].system != sessions[0].system


async def test_any_openai_compatible_server_and_the_host_header() -> None:
    """A minimal chat server (no usage in its stream, no pod header), reached with --host: the
    report sends the Host header and the growing conversation, and times what it streams."""
    seen: list[tuple[str, int]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((request.headers["Host"], len(body["messages"])))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("one ", "two ", "three"):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(_request: web.Request) -> web.Response:
        queries = 100 * len(seen)
        text = f"# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total {queries}\n"
        text += f"# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total {queries / 2}\n"
        return web.Response(text=text)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        cfg = replace(SMALL, gateway=f"http://{address}", host="llm.example.com", sessions=1, turns=3,
                      warmup=1, ramp=(1,))  # fmt: skip
        source = PodsSource.from_list([address])
        doc = await run_report(cfg, source)
        await source.close()
    finally:
        await runner.cleanup()
    # The warm-up's first turn, then one session's turns with 2, 4, 6 messages (system + history).
    assert seen == [
        ("llm.example.com", 2),
        ("llm.example.com", 2),
        ("llm.example.com", 4),
        ("llm.example.com", 6),
    ]
    assert doc["errors"] == 0 and doc["hit_rate"] == 0.5
    assert doc["sessions"][f"{doc['test_id']}-s0"] == {
        "requests": 3,
        "pods": 1,
        "top_pod": address,
        "stickiness": 1.0,
    }
    assert doc["tpot_s"]["p50"] is not None and doc["tpot_s"]["p50"] > 0.005  # 3 chunks, 10 ms apart
