"""GET /metrics as the Go EPP serves it: bearer tokens reviewed by the Kubernetes API
(TokenReview + SubjectAccessReview), HTTPS with --metrics-cert-dir, client certificates with
--metrics-client-ca-file."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from epp.app import App
from epp.discovery.kubeclient import KubeClient, resolve_config_source
from epp.errors import ConfigError
from epp.metrics_server import MetricsAuth, MetricsServer, MetricsTls, TtlCache, bearer_token
from epp.settings import parse_settings
from tests.serving.support import Ca, handshake, make_ca, secret_volume, serial, write_pair
from tests.support.epp_app import running_epp
from tests.support.fake_vllm import FakeVllm
from tests.support.kube_api import (
    PODS,
    POOLS_V1,
    KubeApiServer,
    KubeUser,
    inference_pool,
    pod,
    running_k8s_epp,
)

PROMETHEUS = KubeUser("system:serviceaccount:monitoring:prometheus", "uid-1", ("system:serviceaccounts",))
INTRUDER = KubeUser("system:serviceaccount:default:intruder", "uid-2", ("system:serviceaccounts:default",))


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    server.put(POOLS_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    server.put(PODS, pod("a", "127.0.1.1", {"app": "vllm"}))
    server.tokens = {"prometheus-token": PROMETHEUS, "intruder-token": INTRUDER}
    server.grant(PROMETHEUS.username)  # a ClusterRole with nonResourceURLs [/metrics], verbs [get]
    yield server
    await server.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = await FakeVllm("s0").start()
    yield server
    await server.stop()


async def scrape(
    port: int,
    authorization: str | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    path: str = "/metrics",
) -> tuple[int, str]:
    scheme = "https" if ssl_context else "http"
    headers = {"Authorization": authorization} if authorization else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"{scheme}://127.0.0.1:{port}{path}", headers=headers, ssl=ssl_context or False) as resp,
    ):
        return resp.status, await resp.text()


async def test_metrics_need_a_token_that_kubernetes_authorizes(api: KubeApiServer, kubeconfig: Path) -> None:
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:  # auth is on by default
        port = epp.metrics_port
        assert await scrape(port) == (401, "Unauthorized\n")
        assert await scrape(port, "Basic dXNlcjpwYXNz") == (401, "Unauthorized\n")
        assert await scrape(port, "Bearer") == (401, "Unauthorized\n")
        assert api.reviews["TokenReview"] == 0  # nothing to review
        assert await scrape(port, "Bearer wrong-token") == (401, "Unauthorized\n")
        assert await scrape(port, "Bearer intruder-token") == (
            403,
            f"Authorization denied for user {INTRUDER.username}\n",
        )
        status, text = await scrape(port, "bearer prometheus-token")  # the scheme is case-insensitive
        assert status == 200 and "# TYPE " in text
        # What epp asked: get on the non-resource URL /metrics, for the token's user and groups,
        # with epp's own credentials.
        assert api.access_reviews[-1] == {
            "user": PROMETHEUS.username,
            "uid": PROMETHEUS.uid,
            "groups": list(PROMETHEUS.groups),
            "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
        }
        review_calls = [
            r for r in api.requests if r.path.endswith(("/tokenreviews", "/subjectaccessreviews"))
        ]
        assert {r.authorization for r in review_calls} == {"Bearer test-token"}
        # Decisions are cached: scraping again asks the API server nothing.
        before = dict(api.reviews)
        for _ in range(5):
            assert (await scrape(port, "Bearer prometheus-token"))[0] == 200
            assert (await scrape(port, "Bearer intruder-token"))[0] == 403
            assert (await scrape(port, "Bearer wrong-token"))[0] == 401
        assert api.reviews == before


async def test_a_group_grant_authorizes(api: KubeApiServer, kubeconfig: Path) -> None:
    api.grant("system:serviceaccounts:default")
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        assert (await scrape(epp.metrics_port, "Bearer intruder-token"))[0] == 200


async def test_an_unreachable_api_server_is_a_500(api: KubeApiServer, kubeconfig: Path) -> None:
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        api.partition("epp")
        assert await scrape(epp.metrics_port, "Bearer prometheus-token") == (500, "Authentication failed\n")
        api.heal("epp")
        assert (await scrape(epp.metrics_port, "Bearer prometheus-token"))[0] == 200  # errors are not cached


async def test_auth_off_by_flag(api: KubeApiServer, kubeconfig: Path) -> None:
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool", "--metrics-endpoint-auth=false") as epp:
        assert (await scrape(epp.metrics_port))[0] == 200
    assert api.reviews == {"TokenReview": 0, "SubjectAccessReview": 0}


async def test_standalone_serves_metrics_openly_and_says_so_once(
    fake: FakeVllm, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="epp.app"):
        async with running_epp("--endpoints", fake.address) as epp:
            assert (await scrape(epp.metrics_port))[0] == 200
            assert (await scrape(epp.metrics_port, "Bearer anything"))[0] == 200
    said = [r.message for r in caplog.records if "metrics endpoint auth is off" in r.message]
    assert said == [
        "metrics endpoint auth is off: epp runs outside Kubernetes (standalone endpoints), "
        "so there is no API server to review bearer tokens; /metrics is open"
    ]


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("  bEaReR abc  ") == "abc"
    assert bearer_token("Bearer abc extra") == "abc"  # as the API server reads it
    for bad in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert bearer_token(bad) is None, bad


def test_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache: TtlCache[str, bool] = TtlCache(size=3, clock=lambda: now[0])
    for i in range(5):
        cache.put(f"k{i}", True, ttl_s=10)
    assert len(cache) == 3 and cache.get("k0") is None and cache.get("k4") == (True,)
    cache.put("short", False, ttl_s=1)
    assert cache.get("short") == (False,)
    now[0] = 1.0
    assert cache.get("short") is None


async def test_decisions_are_kept_for_controller_runtimes_times(api: KubeApiServer, kubeconfig: Path) -> None:
    now = [0.0]
    client = KubeClient(resolve_config_source(kubeconfig))
    auth = MetricsAuth(client, clock=lambda: now[0])
    try:

        async def ask(token: str) -> int:
            refused = await auth.check(f"Bearer {token}", "get", "/metrics")
            return 200 if refused is None else refused.status

        assert [await ask("prometheus-token"), await ask("intruder-token"), await ask("wrong")] == [
            200,
            403,
            401,
        ]
        assert api.reviews == {"TokenReview": 3, "SubjectAccessReview": 2}
        now[0] = 11  # a rejected token is reviewed again after 10 s
        await ask("wrong")
        assert api.reviews == {"TokenReview": 4, "SubjectAccessReview": 2}
        now[0] = 31  # a deny after 30 s; and tokens after a minute
        await ask("intruder-token")
        assert api.reviews == {"TokenReview": 4, "SubjectAccessReview": 3}
        now[0] = 61
        await ask("prometheus-token")
        assert api.reviews == {"TokenReview": 5, "SubjectAccessReview": 3}  # the allow lasts 5 minutes
        now[0] = 301
        await ask("prometheus-token")
        assert api.reviews == {"TokenReview": 6, "SubjectAccessReview": 4}
    finally:
        await client.close()


# -- TLS -------------------------------------------------------------------------------------------


def https_client(ca: Ca, client_pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    if client_pair is not None:
        ctx.load_cert_chain(*client_pair)
    return ctx


async def test_metrics_over_https(fake: FakeVllm, tmp_path: Path) -> None:
    ca = make_ca()
    certs = write_pair(tmp_path / "metrics-certs", *ca.issue())
    async with running_epp("--endpoints", fake.address, "--metrics-cert-dir", str(certs)) as epp:
        assert (await scrape(epp.metrics_port, ssl_context=https_client(ca)))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await scrape(epp.metrics_port)  # plain HTTP to an HTTPS port


async def test_metrics_client_certificates(fake: FakeVllm, tmp_path: Path) -> None:
    server_ca, client_ca, other_ca = make_ca("server"), make_ca("clients"), make_ca("other")
    certs = write_pair(tmp_path / "metrics-certs", *server_ca.issue())
    (tmp_path / "client-ca.crt").write_bytes(client_ca.pem)
    good = write_pair(tmp_path / "good", *client_ca.issue((), client=True, common_name="prometheus"))
    bad = write_pair(tmp_path / "bad", *other_ca.issue((), client=True, common_name="stranger"))
    flags = ("--metrics-cert-dir", str(certs), "--metrics-client-ca-file", str(tmp_path / "client-ca.crt"))
    async with running_epp("--endpoints", fake.address, *flags) as epp:
        pair = (good / "tls.crt", good / "tls.key")
        assert (await scrape(epp.metrics_port, ssl_context=https_client(server_ca, pair)))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await scrape(epp.metrics_port, ssl_context=https_client(server_ca))  # no client certificate
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            pair = (bad / "tls.crt", bad / "tls.key")
            await scrape(epp.metrics_port, ssl_context=https_client(server_ca, pair))


async def test_metrics_certificate_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    ca = make_ca()
    first, second = ca.issue(), ca.issue()
    volume = secret_volume(tmp_path / "metrics-tls", *first)
    registry = CollectorRegistry()
    Counter("hello", "a test counter", registry=registry).inc()
    server = MetricsServer(registry, "127.0.0.1", 0, tls=MetricsTls(volume), cert_check_interval_s=0.05)
    port = await server.start()
    try:
        assert (await handshake(port))[0].serial_number == serial(first[0])
        secret_volume(volume, *second)
        for _ in range(100):
            if (await handshake(port))[0].serial_number == serial(second[0]):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the new certificate was not served")
        status, text = await scrape(port, ssl_context=https_client(ca))
        assert status == 200 and "hello_total 1.0" in text
        # A broken pair is not taken: the last good one stays.
        (volume / "..data" / "tls.key").write_bytes(ca.issue()[1])
        await asyncio.sleep(0.2)
        assert (await handshake(port))[0].serial_number == serial(second[0])
    finally:
        await server.stop()


def test_https_metrics_without_any_client_auth_are_refused(tmp_path: Path) -> None:
    certs = write_pair(tmp_path / "metrics-certs", *make_ca().issue())
    settings = parse_settings(
        ["--endpoints", "127.0.0.1:1", "--metrics-cert-dir", str(certs), "--metrics-endpoint-auth=false"]
    )
    with pytest.raises(ConfigError, match='"metrics-cert-dir" enables metrics TLS without authentication'):
        App(settings)


def test_an_unreadable_metrics_certificate_is_a_clear_error(tmp_path: Path) -> None:
    settings = parse_settings(["--endpoints", "127.0.0.1:1", "--metrics-cert-dir", str(tmp_path / "none")])
    with pytest.raises(ConfigError, match=r"--metrics-cert-dir .*: cannot load tls\.crt/tls\.key"):
        App(settings)
