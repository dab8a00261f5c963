"""The scraper against real HTTP servers serving vLLM's Prometheus text."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from epp.datalayer.datastore import Datastore
from epp.datalayer.model_server_metrics import build_engine_table
from epp.datalayer.scraper import ScrapeConfig, Scraper
from epp.framework import Endpoint
from tests.support.epp_app import wait_until
from tests.support.fake_vllm import FakeVllm


@pytest.fixture
async def server() -> AsyncIterator[FakeVllm]:
    fake = await FakeVllm("s0", waiting=4, running=2, kv_usage=0.25).start()
    yield fake
    await fake.stop()


def endpoint_of(fake: FakeVllm) -> Endpoint:
    host, port = fake.address.rsplit(":", 1)
    return Endpoint(host, int(port), fake.name)


async def test_scrape_once_stores_a_fresh_snapshot(server: FakeVllm) -> None:
    store = Datastore()
    ep = endpoint_of(server)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=10.0)
    await scraper.start()
    try:
        assert await scraper.scrape_once(ep)
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (4, 2, 0.25)
        assert (m.block_size, m.num_gpu_blocks) == (16, 4096) and m.updated_at > 0
    finally:
        await scraper.close()


async def test_failed_poll_keeps_the_last_values_and_counts_the_error(server: FakeVllm) -> None:
    store = Datastore()
    ep = endpoint_of(server)
    store.replace_all([ep])
    errors: list[str] = []
    scraper = Scraper(store, interval_s=10.0, on_error=lambda e: errors.append(e.key))
    await scraper.start()
    try:
        # The background poll runs once at start, then not for 10 s: from here on only ours run.
        await wait_until(lambda: ep.metrics.updated_at > 0, what="first poll")
        before = ep.metrics
        server.metrics_status = 500
        assert not await scraper.scrape_once(ep)
        assert not await scraper.scrape_once(ep)
        assert ep.metrics is before  # last good snapshot kept; updated_at does not advance
        assert ep.scrape_errors == 2 and errors == [ep.key, ep.key]
        server.metrics_status = 200
        server.waiting = 9
        assert await scraper.scrape_once(ep)
        assert ep.scrape_errors == 0 and ep.metrics.waiting_queue_size == 9
    finally:
        await scraper.close()


async def test_endpoints_are_polled_while_in_the_pool_and_not_after(server: FakeVllm) -> None:
    store = Datastore()
    scraper = Scraper(store, interval_s=0.02)
    await scraper.start()
    try:
        ep = endpoint_of(server)
        store.replace_all([ep])  # added after start: polling starts by itself
        await wait_until(lambda: ep.metrics.waiting_queue_size == 4, what="first poll")
        server.waiting = 1
        await wait_until(lambda: ep.metrics.waiting_queue_size == 1, what="a later poll")
        store.replace_all([])  # the endpoint leaves the pool: its poll task is cancelled
        server.waiting = 7
        await asyncio.sleep(0.2)  # ten intervals
        assert ep.metrics.waiting_queue_size == 1
    finally:
        await scraper.close()


async def test_an_unreachable_endpoint_is_an_error_not_a_crash() -> None:
    store = Datastore()
    ep = Endpoint("127.0.0.1", 9)  # discard port: nothing listens
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=10.0, timeout_s=0.5)
    await scraper.start()
    try:
        assert not await scraper.scrape_once(ep)
        assert ep.scrape_errors >= 1 and ep.metrics.updated_at == 0  # the ticker's first poll too
        errors = ep.scrape_errors
        assert not await scraper.scrape_once(ep)
        assert ep.scrape_errors == errors + 1
    finally:
        await scraper.close()


# --- where and how pages are read: path, port, scheme, TLS, engine, interval ------------------------


@dataclass
class MetricsPage:
    """An HTTP(S) server on loopback serving one Prometheus page at `path`."""

    text: str
    path: str = "/metrics"
    ssl_context: ssl.SSLContext | None = None
    hits: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(text=self.text, content_type="text/plain")

    async def start(self) -> MetricsPage:
        app = web.Application()
        app.router.add_get(self.path, self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


SGLANG_PAGE = "sglang:num_queue_reqs 6\nsglang:num_running_reqs 2\nsglang:token_usage 0.75\n"


async def scrape(ep: Endpoint, config: ScrapeConfig) -> bool:
    store = Datastore()
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=10.0, config=config, timeout_s=2.0)
    await scraper.start()
    try:
        return await scraper.scrape_once(ep)
    finally:
        await scraper.close()


async def test_path_and_port_from_the_config_and_an_unlabelled_sglang_pod() -> None:
    # TensorRT-LLM-style /prometheus/metrics on a port other than the serving one; the pod has no
    # engine label and the config says defaultEngine sglang.
    page = await MetricsPage(SGLANG_PAGE, path="/prometheus/metrics").start()
    try:
        config = ScrapeConfig(
            path="/prometheus/metrics", port=page.port, engines=build_engine_table(default_engine="sglang")
        )
        ep = Endpoint("127.0.0.1", 9)  # the serving port: nothing listens there
        assert config.url(ep) == f"http://127.0.0.1:{page.port}/prometheus/metrics"
        assert await scrape(ep, config)
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (6, 2, 0.75)
        # The built-in default (vLLM's names) finds nothing on that page.
        other = Endpoint("127.0.0.1", 9)
        assert not await scrape(other, ScrapeConfig(path="/prometheus/metrics", port=page.port))
    finally:
        await page.stop()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "model-server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_scrapes_skip_or_verify_the_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    page = await MetricsPage(SGLANG_PAGE, ssl_context=server_tls).start()
    sglang = build_engine_table(default_engine="sglang")
    try:
        ep = Endpoint("127.0.0.1", page.port)
        # The Go default: https without verifying the model server's certificate.
        assert await scrape(ep, ScrapeConfig(scheme="https", engines=sglang))
        assert ep.metrics.waiting_queue_size == 6
        verify = ScrapeConfig(scheme="https", https_insecure_skip_verify=False, engines=sglang)
        assert not await scrape(Endpoint("127.0.0.1", page.port), verify)  # self-signed: refused
        trusted = ScrapeConfig(
            scheme="https", https_insecure_skip_verify=False, ca_cert_path=str(cert), engines=sglang
        )
        assert await scrape(Endpoint("127.0.0.1", page.port), trusted)
        # Plain http to a TLS port is an error, not a crash.
        assert not await scrape(Endpoint("127.0.0.1", page.port), ScrapeConfig(engines=sglang))
    finally:
        await page.stop()


def test_the_config_wins_over_the_flags_which_win_over_the_defaults() -> None:
    flags = ScrapeConfig(path="/flag/metrics", scheme="http", port=9100, https_insecure_skip_verify=False)
    source = SimpleNamespace(
        scheme=None,
        path="/config/metrics",
        port=None,
        insecure_skip_verify=True,
        ca_cert_path=None,
        client_cert_path=None,
        client_key_path=None,
        interval_s=None,
    )
    merged = flags.with_source(source)
    assert (merged.path, merged.scheme, merged.port, merged.https_insecure_skip_verify) == (
        "/config/metrics",
        "http",
        9100,
        True,
    )
    with pytest.raises(ValueError, match="unsupported scheme 'ftp'"):
        ScrapeConfig(scheme="ftp").with_source(None)
    with pytest.raises(ValueError, match="clientCertPath and clientKeyPath go together"):
        ScrapeConfig(scheme="https", client_cert_path="/c.pem").with_source(None)


async def test_a_source_interval_is_rounded_to_the_base_interval() -> None:
    page = await MetricsPage(SGLANG_PAGE).start()
    store = Datastore()
    scraper = Scraper(
        store,
        interval_s=0.02,
        config=ScrapeConfig(interval_s=0.1, engines=build_engine_table(default_engine="sglang")),
    )
    await scraper.start()
    try:
        ep = Endpoint("127.0.0.1", page.port)
        store.replace_all([ep])
        assert scraper.next_delay(ep) == pytest.approx(0.1)  # 5 x 20 ms
        await asyncio.sleep(1.05)
        assert 5 <= page.hits <= 13  # about 11 at 100 ms, not about 53 at 20 ms
    finally:
        await scraper.close()
        await page.stop()
