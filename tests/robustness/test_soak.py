"""The soak's short form (`make soak` runs it for 10 minutes: bench/epp_bench/soak.py).

12 s at 10 requests/s through a real Envoy and `python -m epp` watching an endpoints file, with a
pod replaced every 2.5 s (the leaving one serves out a 3 s grace, as a terminating pod does) and a
pod whose /metrics fails every scrape (HTTP 500, a page that is not Prometheus text, a page 3 s
late). Not one request may be lost: each completes whole (every token, usage, [DONE]). The report
carries what the long run is judged on (lost requests, epp's RSS growth, p99).
"""

from __future__ import annotations

import math

import pytest

from epp_bench.gateway import EnvoyNotFoundError, find_envoy_binary
from epp_bench.soak import SoakConfig, run_soak, table

pytestmark = pytest.mark.timeout(90)


async def test_twelve_seconds_of_churn_and_failing_scrapes_lose_no_request() -> None:
    try:
        find_envoy_binary()
    except EnvoyNotFoundError as exc:
        pytest.fail(f"{exc} (the soak needs the real Envoy: run `make tools`)")
    cfg = SoakConfig(
        duration_s=12, rate=10, churn_interval_s=2.5, drain_grace_s=3, rss_interval_s=1, warmup_s=5
    )
    report = await run_soak(cfg)
    summary = table(report)
    requests = report["requests"]
    assert requests["sent"] == 120, summary
    assert requests["lost"] == 0, f"{summary}\n{report['epp_log_tail']}"
    # The faults happened: pods were replaced and served requests, scrapes failed and epp saw it.
    assert report["churn"]["events"] >= 4 and report["churn"]["pods_started"] >= 10, summary
    assert requests["served_by_kind"].get("churn", 0) > 0, summary
    served = report["scrape_failures"]["served"]
    assert set(served) == {"status-500", "not-prometheus", "slow"}, served
    assert report["scrape_failures"]["epp_poll_errors"] >= 3, summary
    assert report["epp_counters"]["llm_d_epp_request_error"] == 0, summary
    # What the long run is judged on is reported.
    assert math.isfinite(report["latency_s"]["p99"]) and report["latency_s"]["p99"] < 10, summary
    memory = report["epp_rss_mb"]
    assert memory["samples"] >= 9 and memory["growth_pct"] is not None, summary
    assert memory["max"] < 500, summary  # a leak of any size would show long before this
