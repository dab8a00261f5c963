"""The model servers' prefix-cache counters, per pod, for `python -m epp_bench report`.

vLLM counts prompt tokens looked up in its prefix cache (`vllm:prefix_cache_queries_total`) and
those found (`vllm:prefix_cache_hits_total`); releases before the rename call them
`vllm:gpu_prefix_cache_queries_total` / `..._hits_total`. The current names are read when a pod
has them, else the older ones (never both: the simulator, like some vLLM releases, exposes both
with the same values).

Three sources, all giving {pod: Counters}:
- `PodsSource`: each pod's own /metrics page (fresh on every read: per-request attribution works);
- `PrometheusSource`: a Prometheus server's HTTP API (`GET /api/v1/query`, instant vectors), as
  fresh as its last scrape of the pods;
- `pool_pods`: an InferencePool's ready pods read from Kubernetes, then scraped as `PodsSource`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
OLD_HITS = "vllm:gpu_prefix_cache_hits_total"
OLD_QUERIES = "vllm:gpu_prefix_cache_queries_total"
MAX_METRICS_BYTES = 16 * 1024 * 1024  # a /metrics page is a few hundred kB at most


class CounterError(RuntimeError):
    """A counter source could not be read; the message says what to check."""


@dataclass(frozen=True)
class Counters:
    hits: float
    queries: float

    def minus(self, before: Counters | None) -> Counters:
        """The increase since `before`; a counter that went down was reset (the pod restarted)
        and counts from zero, as Prometheus' increase() does."""
        if before is None:
            return self
        hits = self.hits - before.hits if self.hits >= before.hits else self.hits
        queries = self.queries - before.queries if self.queries >= before.queries else self.queries
        return Counters(hits, queries)


Snapshot = dict[str, Counters]  # pod -> its counters


def delta(after: Snapshot, before: Snapshot) -> Snapshot:
    return {pod: counters.minus(before.get(pod)) for pod, counters in after.items()}


class CounterSource(Protocol):
    # pod -> its address (host:port) where known, to map a served-endpoint header value to a pod.
    addresses: dict[str, str]
    # True when every read is current (scraped now), so a delta around one request shows its pod.
    live: bool

    def describe(self) -> str: ...

    async def read(self) -> Snapshot: ...


def counters_from_text(text: str, where: str) -> Counters:
    """The summed counters (over engines and other labels) of one /metrics page."""
    sums = dict.fromkeys((HITS, QUERIES, OLD_HITS, OLD_QUERIES), 0.0)
    seen: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in sums:
                    sums[sample.name] += sample.value
                    seen.add(sample.name)
    except ValueError as exc:
        raise CounterError(f"{where}: not a Prometheus text page ({exc})") from None
    if {HITS, QUERIES} <= seen:
        return Counters(sums[HITS], sums[QUERIES])
    if {OLD_HITS, OLD_QUERIES} <= seen:
        return Counters(sums[OLD_HITS], sums[OLD_QUERIES])
    raise CounterError(f"{where} has neither {HITS} / {QUERIES} nor {OLD_HITS} / {OLD_QUERIES}")


def metrics_url(value: str) -> str:
    """A pod given as host:port or a URL -> its /metrics URL."""
    text = value.strip()
    if not text:
        raise ValueError("empty pod address")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        raise ValueError(f"expected host:port or http(s)://host:port[/path], got {value!r}")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return f"{parts.scheme}://{parts.netloc}{path}"


class PodsSource:
    """Scrapes each pod's /metrics. `pods`: name -> URL (or host:port)."""

    live = True

    def __init__(self, pods: Mapping[str, str], timeout_s: float = 5.0) -> None:
        if not pods:
            raise ValueError("no pods to read counters from")
        self.urls = {name: metrics_url(url) for name, url in pods.items()}
        self.addresses = {name: urlsplit(url).netloc for name, url in self.urls.items()}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_list(cls, urls: Sequence[str]) -> PodsSource:
        """Pods named by their address (host:port)."""
        return cls({urlsplit(metrics_url(u)).netloc: u for u in urls})

    def describe(self) -> str:
        return f"/metrics of {len(self.urls)} pods"

    async def _get(self, session: aiohttp.ClientSession, pod: str, url: str) -> Counters:
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise CounterError(f"{url} answered HTTP {resp.status}")
                body = await resp.content.read(MAX_METRICS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CounterError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
        if len(body) > MAX_METRICS_BYTES:
            raise CounterError(f"{url} is larger than {MAX_METRICS_BYTES} bytes")
        return counters_from_text(body.decode("utf-8", "replace"), url)

    async def read(self) -> Snapshot:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        values = await asyncio.gather(*(self._get(self._session, p, u) for p, u in self.urls.items()))
        return dict(zip(self.urls, values, strict=True))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class PrometheusSource:
    """A Prometheus server's instant-query API: `sum by (pod, instance) (COUNTER{selector})`.

    A series is named by its `pod` label (what the Prometheus Operator's PodMonitor adds), else
    by `instance`; `instance` (host:port of the scrape target) is the pod's address. The values
    are as old as Prometheus' last scrape: wait a scrape interval before reading (`--settle`)."""

    live = False

    def __init__(self, url: str, selector: str = "", timeout_s: float = 10.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if not parts.hostname or parts.scheme not in ("http", "https"):
            raise ValueError(f"--prometheus expects http(s)://host:port, got {url!r}")
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        selector = selector.strip()
        if selector and not (selector.startswith("{") and selector.endswith("}")):
            selector = "{" + selector + "}"
        self.selector = selector
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.addresses: dict[str, str] = {}

    def describe(self) -> str:
        return f"Prometheus {self.base}" + (f" {self.selector}" if self.selector else "")

    async def _query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query"
        try:
            async with session.get(url, params={"query": expr}) as resp:
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    raise CounterError(f"{url} answered HTTP {resp.status}, not JSON") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CounterError(f"cannot query {url}: {type(exc).__name__}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            error = doc.get("error", doc) if isinstance(doc, dict) else doc
            raise CounterError(f"Prometheus refused {expr!r}: {error}")
        data = doc.get("data") or {}
        if data.get("resultType") != "vector":
            raise CounterError(f"Prometheus answered {data.get('resultType')!r} to {expr!r}, not a vector")
        return list(data.get("result") or [])

    async def _pair(self, session: aiohttp.ClientSession, hits: str, queries: str) -> Snapshot:
        out: dict[str, list[float]] = {}
        for index, name in enumerate((hits, queries)):
            for series in await self._query(session, f"sum by (pod, instance) ({name}{self.selector})"):
                labels = series.get("metric") or {}
                pod = labels.get("pod") or labels.get("instance") or "(unlabelled)"
                if labels.get("instance"):
                    self.addresses[pod] = labels["instance"]
                out.setdefault(pod, [0.0, 0.0])[index] += float(series["value"][1])
        return {pod: Counters(h, q) for pod, (h, q) in out.items()}

    async def read(self) -> Snapshot:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            snapshot = await self._pair(session, HITS, QUERIES)
            if not snapshot:
                snapshot = await self._pair(session, OLD_HITS, OLD_QUERIES)
        if not snapshot:
            raise CounterError(
                f"{self.describe()} has no series of {HITS} or {OLD_HITS}: is it scraping the "
                "model servers (a PodMonitor), and does the selector match?"
            )
        return snapshot


# -- an InferencePool's pods ---------------------------------------------------------------------

POOL_VERSIONS = (("inference.networking.k8s.io", "v1"), ("inference.networking.x-k8s.io", "v1alpha2"))


def _pool_selector_and_ports(pool: Mapping[str, Any], name: str) -> tuple[dict[str, str], list[int]]:
    """(matchLabels, target ports) of an InferencePool in the v1 or the v1alpha2 shape."""
    spec = pool.get("spec") or {}
    selector = spec.get("selector") or {}
    labels = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if "targetPorts" in spec:
        ports = [int(p["number"]) for p in spec.get("targetPorts") or []]
    else:
        ports = [int(spec["targetPortNumber"])] if spec.get("targetPortNumber") else []
    if not labels or not isinstance(labels, dict) or not ports:
        raise CounterError(f"InferencePool {name} has no selector labels or no target ports")
    return {str(k): str(v) for k, v in labels.items()}, ports


def _ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return (
        not (pod.get("metadata") or {}).get("deletionTimestamp")
        and status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and conditions.get("Ready") == "True"
    )


async def pool_pods(name: str, namespace: str, kubeconfig: Path | None = None) -> dict[str, str]:
    """The ready pods of InferencePool `namespace/name`: {pod (pod:port with several target
    ports): ip:port}. The v1 API group is tried first, then v1alpha2. Credentials: `kubeconfig`;
    without it, in a pod the in-cluster service account, elsewhere $KUBECONFIG / ~/.kube/config."""
    from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
    from kubernetes_asyncio.client.exceptions import ApiException
    from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

    config = Configuration()
    try:
        if kubeconfig is not None or not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
            await load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                client_configuration=config,
                persist_config=False,
            )
        else:
            load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as exc:
        raise CounterError(f"--pool: no Kubernetes credentials ({exc}); pass --kubeconfig") from None
    async with ApiClient(configuration=config) as api:
        pool: dict[str, Any] | None = None
        try:
            for group, version in POOL_VERSIONS:
                try:
                    pool = await CustomObjectsApi(api).get_namespaced_custom_object(
                        group, version, namespace, "inferencepools", name
                    )
                    break
                except ApiException as exc:
                    if exc.status != 404:
                        raise
            if pool is None:
                raise CounterError(f"InferencePool {namespace}/{name} not found")
            labels, ports = _pool_selector_and_ports(pool, f"{namespace}/{name}")
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            pods = await CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)
        except ApiException as exc:
            raise CounterError(f"--pool: the Kubernetes API answered {exc.status}: {exc.reason}") from None
        except aiohttp.ClientError as exc:
            raise CounterError(f"--pool: cannot reach the Kubernetes API: {exc}") from None
    out: dict[str, str] = {}
    for pod in api.sanitize_for_serialization(pods)["items"]:
        if not _ready(pod):
            continue
        pod_name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        for port in ports:
            out[pod_name if len(ports) == 1 else f"{pod_name}:{port}"] = f"{host}:{port}"
    if not out:
        raise CounterError(f"InferencePool {namespace}/{name} has no ready pod (selector {selector})")
    return out
