"""epp scrapes as its config and flags say: the `metrics-data-source` and `core-metrics-extractor`
parameters, the `--model-server-metrics-*` and `*-metric` flags, and which wins (the config,
then the flags, then the defaults, as in the Go EPP). Real epp, real HTTP model-server pages."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from epp.app import App
from epp.framework import ConfigError
from epp.settings import parse_settings
from tests.datalayer.test_scraper import SGLANG_PAGE, MetricsPage
from tests.support.epp_app import running_epp, wait_until

SGLANG_CONFIG = """\
apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: metrics-data-source
  parameters: {scheme: http, path: /prometheus/metrics}
- type: core-metrics-extractor
  parameters: {defaultEngine: sglang}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
"""


@pytest.fixture
async def sglang_page() -> AsyncIterator[MetricsPage]:
    page = await MetricsPage(SGLANG_PAGE, path="/prometheus/metrics").start()
    yield page
    await page.stop()


async def test_an_unlabelled_sglang_pool_is_read_with_sglang_names(sglang_page: MetricsPage) -> None:
    async with running_epp(
        "--endpoints", f"127.0.0.1:{sglang_page.port}", "--config-text", SGLANG_CONFIG
    ) as epp:
        (ep,) = epp.app.datastore.endpoints()
        await wait_until(lambda: ep.metrics.updated_at > 0, what="a scrape of /prometheus/metrics")
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (6, 2, 0.75)
        assert epp.app.scraper.config.path == "/prometheus/metrics"


async def test_the_config_wins_over_the_path_flag(sglang_page: MetricsPage) -> None:
    async with running_epp(
        "--endpoints",
        f"127.0.0.1:{sglang_page.port}",
        "--config-text",
        SGLANG_CONFIG,
        "--model-server-metrics-path=/flag-path",
    ) as epp:
        assert epp.app.scraper.config.path == "/prometheus/metrics"


async def test_flags_set_the_path_port_and_metric_names_without_a_config() -> None:
    page = await MetricsPage(
        'my_queue{tier="gold"} 3\nmy_queue{tier="free"} 50\nmy_running 4\nmy_kv 0.5\n', path="/stats"
    ).start()
    try:
        async with running_epp(
            "--endpoints",
            "127.0.0.1:9",  # the serving port; the metrics are on another
            f"--model-server-metrics-port={page.port}",
            "--model-server-metrics-path=/stats",
            '--total-queued-requests-metric=my_queue{tier="gold"}',
            "--total-running-requests-metric=my_running",
            "--kv-cache-usage-percentage-metric=my_kv",
        ) as epp:
            (ep,) = epp.app.datastore.endpoints()
            await wait_until(lambda: ep.metrics.updated_at > 0, what="a scrape of /stats")
            m = ep.metrics
            assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (3, 4, 0.5)
    finally:
        await page.stop()


def test_a_bad_metric_flag_stops_epp_with_the_reason() -> None:
    settings = parse_settings(
        ["--endpoints", "127.0.0.1:9", "--secure-serving=false", "--kv-cache-usage-percentage-metric=kv{"]
    )
    with pytest.raises(
        ConfigError, match="--kv-cache-usage-percentage-metric: not a valid metric specification"
    ):
        App(settings)
    result = subprocess.run(
        [sys.executable, "-m", "epp", "--endpoints", "127.0.0.1:9", "--lora-info-metric=lora{x}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "--lora-info-metric: invalid label pair 'x'" in result.stderr
