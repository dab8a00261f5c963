"""The connection to the Kubernetes API server (kubernetes-asyncio), shared by discovery and HA.

Where the client configuration comes from, in the order controller-runtime (the Go EPP) uses:
`--kubeconfig PATH`, then `$KUBECONFIG` (a path list), then the in-cluster service account
(`KUBERNETES_SERVICE_HOST` and the mounted token), then `~/.kube/config`. `check()` validates the
choice synchronously so the `epp` command can refuse to start with a one-line reason; the
configuration itself is loaded on first use, inside the event loop (kubeconfig auth plugins are
asynchronous), and exec/GCP tokens are refreshed in the background.

Responses are read as raw JSON (`_preload_content=False`) rather than deserialised into the
generated models: discovery needs a handful of fields, and a pod list of thousands of objects
parses several times faster that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio.client import ApiClient, AuthenticationV1Api, AuthorizationV1Api, Configuration
from kubernetes_asyncio.config import load_incluster_config, load_kube_config, refresh_token
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger

from epp.errors import KubeApiError, KubeConfigError
from epp.supervision import current_supervisor

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = "~/.kube/config"
# How often exec and GCP credentials are checked for expiry (kubernetes-asyncio's default).
TOKEN_REFRESH_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class KubeConfigSource:
    """A kubeconfig path list (os.pathsep-separated), or None for the in-cluster service account."""

    kubeconfig: str | None

    def describe(self) -> str:
        return "in-cluster service account" if self.kubeconfig is None else f"kubeconfig {self.kubeconfig}"


def resolve_config_source(flag: Path | None, environ: Mapping[str, str] = os.environ) -> KubeConfigSource:
    if flag is not None:
        if not flag.expanduser().is_file():
            raise KubeConfigError(f"--kubeconfig {flag}: no such file")
        return KubeConfigSource(str(flag.expanduser()))
    env = environ.get("KUBECONFIG", "")
    if env:
        if not any(Path(p).expanduser().is_file() for p in env.split(os.pathsep) if p):
            raise KubeConfigError(f"KUBECONFIG={env}: no such file")
        return KubeConfigSource(env)
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return KubeConfigSource(None)
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    if default.is_file():
        return KubeConfigSource(str(default))
    raise KubeConfigError(
        "no Kubernetes client config: not running in a cluster (KUBERNETES_SERVICE_HOST is unset) "
        f"and no {DEFAULT_KUBECONFIG}; give --kubeconfig PATH or set KUBECONFIG"
    )


def check_config_source(source: KubeConfigSource) -> None:
    """Fail fast on a kubeconfig without a usable current context, or a pod without a token."""
    try:
        if source.kubeconfig is None:
            load_incluster_config(client_configuration=Configuration())  # type: ignore[no-untyped-call]
        else:
            merged = KubeConfigMerger(source.kubeconfig).config
            if merged is None:
                raise KubeConfigError(f"{source.describe()}: empty or unreadable")
            KubeConfigLoader(config_dict=merged, config_base_path=None)
    except KubeConfigError:
        raise
    except Exception as exc:  # ConfigException, YAML and I/O errors: all mean "cannot use it"
        text = str(exc).replace("\n", " ") or type(exc).__name__
        raise KubeConfigError(f"{source.describe()}: {text}") from None


class KubeClient:
    """One kubernetes-asyncio ApiClient, created on first use and closed with `close()`."""

    def __init__(self, source: KubeConfigSource, user_agent: str = "epp") -> None:
        self.source = source
        self.user_agent = user_agent
        self._api: ApiClient | None = None
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None

    async def api(self) -> ApiClient:
        async with self._lock:
            if self._api is None:
                config = Configuration()
                if self.source.kubeconfig is None:
                    # Re-reads the (rotated) service account token by itself.
                    load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
                else:
                    loader = await load_kube_config(
                        config_file=self.source.kubeconfig, client_configuration=config, persist_config=False
                    )
                    # Exec and GCP auth plugins hand out short-lived tokens; this returns at once
                    # for other kinds of credentials. Supervised: a credential plugin that fails
                    # once (a network blip) is logged, counted and retried, not left dead.
                    self._refresher = current_supervisor().spawn(
                        "kube-token-refresh",
                        lambda: refresh_token(loader, config, interval=TOKEN_REFRESH_INTERVAL_S),
                        detail=self.source.describe(),
                    )
                api = ApiClient(configuration=config)
                api.user_agent = self.user_agent
                self._api = api
                log.info("Kubernetes API server %s (%s)", config.host, self.source.describe())
            return self._api

    async def create_token_review(self, token: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """POST an authentication.k8s.io/v1 TokenReview: whom the bearer `token` belongs to. The
        answer's `status` holds `authenticated` and `user` (username, uid, groups, extra)."""
        body: Any = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        resp = await raw_response(
            AuthenticationV1Api(await self.api()).create_token_review(
                body, _preload_content=False, _request_timeout=aiohttp.ClientTimeout(total=timeout_s)
            )
        )
        return await read_json(resp)

    async def create_subject_access_review(
        self, spec: Mapping[str, Any], timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """POST an authorization.k8s.io/v1 SubjectAccessReview with `spec` (user, groups, and
        resourceAttributes or nonResourceAttributes); the answer's `status.allowed` decides."""
        body: Any = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": dict(spec),
        }
        resp = await raw_response(
            AuthorizationV1Api(await self.api()).create_subject_access_review(
                body, _preload_content=False, _request_timeout=aiohttp.ClientTimeout(total=timeout_s)
            )
        )
        return await read_json(resp)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._api is not None:
            await self._api.close()
            self._api = None


async def raw_response(call: Awaitable[Any]) -> aiohttp.ClientResponse:
    """The response of a kubernetes-asyncio API call made with `_preload_content=False`: the
    aiohttp response itself (the methods' annotations name the model they would otherwise build)."""
    resp = await call
    if not isinstance(resp, aiohttp.ClientResponse):
        raise TypeError(f"expected a raw response (_preload_content=False), got {type(resp).__name__}")
    return resp


async def read_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The body of a non-streaming response; KubeApiError for a non-2xx status."""
    try:
        body = await resp.read()
    finally:
        resp.release()
    if not 200 <= resp.status < 300:
        raise KubeApiError.from_status(resp.status, body)
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        raise KubeApiError(resp.status, "BadResponse", "expected a JSON object")
    return doc


async def read_events(resp: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any], None]:
    """The events of a watch response, one JSON object a line, until the server ends the stream."""
    with contextlib.closing(resp):
        if resp.status != 200:
            raise KubeApiError.from_status(resp.status, await resp.read())
        while line := await resp.content.readline():
            if line.strip():
                event = orjson.loads(line)
                if not isinstance(event, dict):
                    raise KubeApiError(resp.status, "BadResponse", "watch event is not a JSON object")
                yield event
