"""The Grafana dashboard of deploy/components/monitoring queries only what really exists.

Every PromQL expression of the dashboard (panel targets and template variables) is taken apart
into the metric names it reads and the labels its selectors match on; each name must be one that
a running simulator's or a running epp's /metrics page declares (both started here, with traffic
through a real Envoy so that labelled series exist), and each selector label one those series
carry, or a label Prometheus adds to every scraped series (`namespace`, `pod`, ...)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess
from tests.conftest import StartSim

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "components" / "monitoring"
# Labels Prometheus (a ServiceMonitor / PodMonitor) puts on every series it scrapes.
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "service", "endpoint"}
# vLLM's older name for its inter-token histogram (before vllm:inter_token_latency_seconds, which
# the simulator exposes): the dashboard reads both, the simulator serves only the current one.
VLLM_ONLY = {"vllm:time_per_output_token_seconds_bucket"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}  # fmt: skip

Exposed = dict[str, set[str]]  # metric (sample) name -> its label names


# -- PromQL, taken apart ----------------------------------------------------------------------------

_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_]\w*)\s*\)$")


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """Every metric an expression reads: (name, {label: matched value}), bare names with {}."""
    label_values = _LABEL_VALUES.match(expr.strip())
    if label_values:
        return [(label_values.group(1), {})]
    text = _RANGE.sub("", expr)
    found: list[tuple[str, dict[str, str]]] = []
    for m in _SELECTOR.finditer(text):
        matchers = dict(_MATCHER.findall(m.group(2)))
        if not m.group(1):
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        found.append((m.group(1), matchers))
    rest = _GROUPING.sub(" ", _SELECTOR.sub(" ", text))
    for m in _NAME.finditer(rest):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS or re.fullmatch(r"\d.*", name):
            continue  # a function, a keyword, a number
        found.append((name, {}))
    return found


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query template variable."""
    out = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))  # rows
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append((f"variable {var['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def problems(dashboard: dict[str, Any], exposed: Exposed) -> list[str]:
    """What in the dashboard does not match what is exposed."""
    found = []
    for where, expr in dashboard_expressions(dashboard):
        used = selectors(expr)
        if not used:
            found.append(f"{where}: reads no metric: {expr}")
        for name, matchers in used:
            if name in VLLM_ONLY:
                continue
            if name not in exposed:
                found.append(f"{where}: {name} is exposed by neither the simulator nor epp")
                continue
            unknown = set(matchers) - exposed[name] - TARGET_LABELS
            if unknown:
                found.append(f"{where}: {name} has no label {sorted(unknown)}")
            if not where.startswith("variable") and matchers.get("namespace") != "$namespace":
                found.append(f"{where}: {name} is not filtered by the dashboard's $namespace")
    return found


def test_the_promql_reader_finds_names_and_labels() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (pod, le) (rate(a:b_bucket{namespace="$namespace",x=~"y"}[5m]))) '
        "/ ignoring (pod) group_left sum(c_total) or vector(0) > bool 1"
    )
    assert selectors(expr) == [("a:b_bucket", {"namespace": "$namespace", "x": "y"}), ("c_total", {})]
    assert selectors("label_values(llm_d_epp_ready_endpoints, namespace)") == [
        ("llm_d_epp_ready_endpoints", {})
    ]
    exposed = {"known_total": {"namespace", "status"}}
    bad = {
        "panels": [
            {
                "title": "t",
                "targets": [
                    {"refId": "A", "expr": 'rate(known_total{namespace="$namespace",statuz="x"}[1m])'},
                    {"refId": "B", "expr": "rate(made_up_total[1m])"},
                    {"refId": "C", "expr": "sum(known_total)"},
                ],
            },
        ],
        "templating": {"list": []},
    }
    assert problems(bad, exposed) == [
        "panel 't' A: known_total has no label ['statuz']",
        "panel 't' B: made_up_total is exposed by neither the simulator nor epp",
        "panel 't' C: known_total is not filtered by the dashboard's $namespace",
    ]


# -- what the simulator and epp really expose ------------------------------------------------------


def exposition(text: str) -> Exposed:
    """Sample names with their label names, and every declared family (# TYPE), samples or not."""
    out: Exposed = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            for suffix in ("_bucket", "_sum", "_count") if kind == "histogram" else ("",):
                out.setdefault(name + suffix, set())
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture
async def exposed(start_sim: StartSim) -> AsyncIterator[Exposed]:
    sims = [await start_sim() for _ in range(2)]
    addresses = [s.address for s in sims]
    async with (
        EppProcess(addresses, extra_args=["--log-level", "warning"]) as epp,
        EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gw,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
    ):
        for i in range(4):  # streamed and not: every request-path series gets samples
            body = {"model": "sim-model", "prompt": f"hello {i} " * 40, "max_tokens": 4, "stream": i % 2 == 0}
            async with http.post(f"{gw.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
        pages = [await (await http.get(f"http://{a}/metrics")).text() for a in addresses]
        pages.append(await (await http.get(epp.metrics_url)).text())
    merged: Exposed = {}
    for page in pages:
        for name, labels in exposition(page).items():
            merged.setdefault(name, set()).update(labels)
    yield merged


def dashboard() -> dict[str, Any]:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "epp-grafana-dashboard"]
    (file,) = generator["files"]
    loaded: dict[str, Any] = json.loads((MONITORING / file).read_text())
    return loaded


async def test_every_dashboard_query_reads_exposed_metrics(exposed: Exposed) -> None:
    board = dashboard()
    assert problems(board, exposed) == []
    assert "vllm:prefix_cache_hits_total" in exposed and "llm_d_epp_scheduler_attempts_total" in exposed


def test_the_dashboard_shows_the_reports_figures_live() -> None:
    """Hit rate, TTFT, ITL, queue and running per pod, epp's scheduling latency and decisions."""
    exprs = {title: expr for title, expr in dashboard_expressions(dashboard())}
    text = " ".join(exprs.values())
    for needle in (
        "rate(vllm:prefix_cache_hits_total",
        "rate(vllm:gpu_prefix_cache_hits_total",  # older vLLM
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "llm_d_epp_request_streaming_itl_seconds_bucket",
        'sum by (pod) (vllm:num_requests_waiting{namespace="$namespace"})',
        'sum by (pod) (vllm:num_requests_running{namespace="$namespace"})',
        "llm_d_epp_scheduler_e2e_duration_seconds_bucket",
        "sum by (endpoint_name) (rate(llm_d_epp_scheduler_attempts_total",
    ):
        assert needle in text, needle
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
