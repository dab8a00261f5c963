"""The four performance commands (`python -m epp_bench extproc | pick | scrape | memory`), each
run once at a small size in its own process: the table is printed, the JSON has the documented
shape and says the work was done. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.datalayer.model_server_metrics import VLLM, parse_metrics
from epp.extproc.messages import MAX_BODY_CHUNK
from epp_bench.perf.extproc import EchoServicer, stream_messages
from epp_bench.perf.summary import scrape as scrape_table
from epp_bench.perf.vllm_page import only_families, page

pytestmark = pytest.mark.timeout(180)


def bench(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp_bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_ok(tmp_path: Path, *args: str) -> tuple[str, Any]:
    out = tmp_path / "out.json"
    done = bench(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_pick_writes_one_row_per_case(tmp_path: Path) -> None:
    stdout, rows = run_ok(tmp_path, "pick", "--endpoints", "4,20", "--prompt-chars", "3000", "--picks", "50")
    assert [set(r) for r in rows] == [{"endpoints", "prompt_chars", "p50_ms", "p99_ms"}] * 2
    assert [(r["endpoints"], r["prompt_chars"]) for r in rows] == [(4, 3000), (20, 3000)]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert "p50 ms" in stdout


def test_pick_refuses_a_bad_count() -> None:
    done = bench("pick", "--endpoints", "0")
    assert done.returncode == 2 and "values must be positive" in done.stderr


def test_memory_fills_the_index_and_reports_bytes_per_entry(tmp_path: Path) -> None:
    stdout, row = run_ok(tmp_path, "memory", "--pods", "4", "--blocks", "2000", "--shared", "0.5")
    assert row["entries"] == 4 * 2000  # every pod's LRU full, at its capacity
    assert row["distinct_blocks"] < row["entries"]  # some blocks held by two pods
    assert row["estimate_bytes_per_entry"] > 0 and row["rss_mb"] > 0
    assert "bytes/entry" in stdout


def test_scrape_measures_an_idle_epp_scraping_idle_and_busy_pods_with_and_without_idle_polling(
    tmp_path: Path,
) -> None:
    stdout, rows = run_ok(
        tmp_path, "scrape", "--pods", "3", "--seconds", "2", "--warmup", "1", "--interval", "100ms"
    )
    idle, idle_whole, idle_slow, busy, floor_whole, floor = rows
    assert [r["client"] for r in rows] == ["epp", "epp", "epp", "epp", "floor", "floor"]
    assert [r["pods_state"] for r in rows] == ["idle", "idle", "idle", "busy", "idle", "idle"]
    every = "every interval"
    assert [r["idle_interval"] for r in rows] == [every, every, "every 1s", every, every, every]
    families, whole = "families read", "whole"
    assert [r["pages"] for r in rows] == [families, whole, families, families, whole, families]
    idle_page = page(waiting=0, running=0, kv=0.0)
    small = len(only_families(idle_page, VLLM.families_query))
    for row in rows:
        assert row["pods"] == 3 and row["expected_scrapes_per_s"] == 30 and row["cpu_percent"] >= 0
        # The pods' server counted the bytes it sent: epp asked for the families it reads (and
        # the pods, as vLLM's prometheus-client, served only those), or whole pages when told to
        # (the busy pods' gauges vary, and their pages' lengths by a few bytes).
        expected = len(idle_page) if row["pages"] == whole else small
        assert row["page_bytes"] == pytest.approx(expected, rel=0.01 if row is busy else 0)
    assert small < len(idle_page) / 20
    # CPU comes from /proc in 10 ms ticks: polled every interval, epp spends some in 2 s; idle
    # pods polled once a second (about 6 polls, under a tick on uvloop) may read as 0.
    assert idle_whole["cpu_percent"] > 0 and busy["cpu_percent"] > 0
    # By default (as the Go EPP) every pod is polled every interval, idle or not (30 a second at
    # most); with --idle-refresh-metrics-interval=1s idle pods are polled about once a second.
    assert idle["scrapes_per_s"] > 10 and idle_whole["scrapes_per_s"] > 10 and busy["scrapes_per_s"] > 10
    assert 0 < idle_slow["scrapes_per_s"] < 6
    # The floor client polls the same pods as often (the pods' server counted its answers).
    assert 10 < floor["scrapes_per_s"] <= 31 and 10 < floor_whole["scrapes_per_s"] <= 31
    assert "floor" in stdout
    # The docs' table (perf.summary) names each row's client.
    assert [line.split(" | ")[0] for line in scrape_table(rows).splitlines()[2:]] == [
        "| epp", "| epp, whole pages (as Go)", "| epp, idle pods every 1s", "| epp",
        "| floor (no parsing), whole pages", "| floor (no parsing), families read",
    ]  # fmt: skip


def test_the_fixture_page_is_a_vllm_page_epp_reads() -> None:
    body = page(waiting=7, running=3, kv=0.25)
    assert 40_000 < len(body) < 80_000  # tens of kilobytes, as a real vLLM 0.11 page
    assert body.count(b"# TYPE vllm:") >= 25 and body.count(b"_bucket{") > 300
    metrics = parse_metrics(body, VLLM, 1.0)
    assert (metrics.waiting_queue_size, metrics.running_requests, metrics.kv_cache_usage) == (7, 3, 0.25)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (16, 29127)


def test_extproc_compares_epp_with_the_do_nothing_server(tmp_path: Path) -> None:
    stdout, doc = run_ok(
        tmp_path,
        "extproc",
        *("--endpoints", "3", "--body-kb", "1,70", "--requests", "60"),
        *("--max-seconds", "10", "--concurrency", "4"),
    )
    runs = doc["runs"]
    assert [(r["server"], r["body_kb"]) for r in runs] == [
        ("do-nothing", 1),
        ("epp", 1),
        ("do-nothing", 70),
        ("epp", 70),
    ]
    for r in runs:
        assert r["requests"] == 60 and r["requests_per_s"] > 0 and r["cpu_us_per_request"] > 0
        assert r["p50_ms"] <= r["p99_ms"]
        # The server's CPU split between its event-loop thread and the others (gRPC's).
        assert r["loop_cpu_us_per_request"] > 0 and r["other_cpu_us_per_request"] >= 0
        split = r["loop_cpu_us_per_request"] + r["other_cpu_us_per_request"]
        assert split == pytest.approx(r["cpu_us_per_request"], abs=0.2)
    assert all(r["rps_ratio"] > 0 and r["cpu_ratio"] > 0 for r in runs if r["server"] == "epp")
    assert "CPU vs floor" in stdout and "loop thread" in stdout


def test_extproc_echo_server_replies_as_full_duplex_streamed_requires(tmp_path: Path) -> None:
    """--echo adds the echo server, measured against the do-nothing server like epp; what it
    answers is what Envoy needs from any ext_proc server in FULL_DUPLEX_STREAMED mode."""
    stdout, doc = run_ok(
        tmp_path,
        "extproc",
        *("--endpoints", "3", "--body-kb", "70", "--requests", "30", "--echo"),
        *("--max-seconds", "10", "--concurrency", "2"),
    )
    assert [r["server"] for r in doc["runs"]] == ["do-nothing", "echo", "epp"]
    echo = doc["runs"][1]
    assert echo["requests"] == 30 and echo["cpu_ratio"] > 0 and echo["rps_ratio"] > 0
    assert "echo" in stdout


async def test_the_echo_server_routes_and_echoes_each_body_in_chunks() -> None:
    body = b"x" * (MAX_BODY_CHUNK + 10)

    async def messages() -> AsyncIterator[pb.ProcessingRequest]:
        for message in stream_messages(body):
            yield message

    replies = [r async for r in EchoServicer().Process(messages(), None)]
    kinds = [r.WhichOneof("response") for r in replies]
    assert kinds == ["request_headers", "request_body", "request_body", "response_headers", "response_body"]
    mutation = replies[0].request_headers.response.header_mutation
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers} == {
        "x-gateway-destination-endpoint": b"127.0.0.1:9",
        "content-length": str(len(body)).encode(),
    }
    lb = replies[0].dynamic_metadata.fields["envoy.lb"].struct_value
    assert lb.fields["x-gateway-destination-endpoint"].string_value == "127.0.0.1:9"
    chunks = [r.request_body.response.body_mutation.streamed_response for r in replies[1:3]]
    assert b"".join(c.body for c in chunks) == body and [c.end_of_stream for c in chunks] == [False, True]
    last = replies[4].response_body.response.body_mutation.streamed_response
    assert last.body == stream_messages(body)[3].response_body.body and last.end_of_stream


def test_extproc_repeated_reports_medians_and_each_rounds_ratio(tmp_path: Path) -> None:
    """--repeat N alternates the do-nothing server and epp N times per case: each row holds its
    figures' medians, and an epp row each round's ratios (against that round's floor)."""
    stdout, doc = run_ok(
        tmp_path,
        "extproc",
        *("--endpoints", "3", "--body-kb", "1", "--requests", "40", "--repeat", "2"),
        *("--max-seconds", "10", "--concurrency", "4"),
    )
    assert doc["repeat"] == 2
    floor, epp = doc["runs"]
    assert (floor["server"], epp["server"], floor["rounds"], epp["rounds"]) == ("do-nothing", "epp", 2, 2)
    assert len(epp["cpu_ratio_rounds"]) == len(epp["rps_ratio_rounds"]) == 2
    low, high = sorted(epp["cpu_ratio_rounds"])
    assert low <= epp["cpu_ratio"] <= high  # the median of the two
    assert "medians of 2 rounds" in stdout and "epp 3 endpoints, 1 kB: " in stdout
    refused = bench("extproc", "--repeat", "0")
    assert refused.returncode == 2 and "must be positive" in refused.stderr
