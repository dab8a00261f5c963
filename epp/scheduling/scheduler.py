"""The scheduler: runs the data producers, asks the profile handler which profiles to run, runs
them, and returns the result. It also runs the request-lifecycle hooks of its plugins for the
director, timing each one into the plugin-duration histogram."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from epp.errors import EppError, ErrorCode
from epp.framework import (
    DATA_PRODUCER_POINT,
    PRE_REQUEST_POINT,
    PROFILE_PICKER_POINT,
    RESPONSE_COMPLETE_POINT,
    RESPONSE_RECEIVED_POINT,
    CycleState,
    DataProducer,
    Endpoint,
    EndpointListener,
    InferenceRequest,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    ResponseComplete,
    ResponseHeaders,
    RoutingHeaders,
    SchedulingResult,
)
from epp.scheduling.profile import PluginTimer, SchedulerProfile, plugin_name, plugin_type

log = logging.getLogger(__name__)

_MAX_ROUNDS = 8  # a handler that never stops asking must not hang a request


class Scheduler:
    def __init__(
        self,
        handler: ProfileHandler,
        profiles: Mapping[str, SchedulerProfile],
        plugins: Sequence[Any] = (),
        timer: PluginTimer | None = None,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.handler = handler
        self.profiles = dict(profiles)
        self._profile_names = list(self.profiles)
        self._timer = timer
        # Every plugin instance, and its hooks resolved once.
        self.plugins = list(plugins)
        self.producers = [p for p in self.plugins if isinstance(p, DataProducer)]
        self.pre_request_hooks = [p for p in self.plugins if isinstance(p, PreRequest)]
        self.response_header_hooks = [p for p in self.plugins if isinstance(p, ResponseHeaders)]
        self.response_complete_hooks = [p for p in self.plugins if isinstance(p, ResponseComplete)]
        self.endpoint_listeners = [p for p in self.plugins if isinstance(p, EndpointListener)]
        # A P/D handler tells the decode pod where to prefill; a single-profile one has nothing to say.
        self._routing_headers = handler if isinstance(handler, RoutingHeaders) else None
        self._labels = {id(p): (plugin_type(p), plugin_name(p)) for p in [*self.plugins, handler]}

    def _observe(self, point: str, plugin: object, started: float) -> None:
        if self._timer is not None:
            kind, name = self._labels.get(id(plugin)) or (plugin_type(plugin), plugin_name(plugin))
            self._timer(point, kind, name, time.perf_counter() - started)

    def schedule(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> SchedulingResult:
        for producer in self.producers:
            started = time.perf_counter()
            producer.produce(cycle, request, candidates)
            self._observe(DATA_PRODUCER_POINT, producer, started)
        results: dict[str, ProfileResult | None] = {}
        in_handler = 0.0  # the handler's time over all rounds: one observation per request
        for _ in range(_MAX_ROUNDS):
            started = time.perf_counter()
            names = self.handler.pick_profiles(cycle, request, self._profile_names, results)
            in_handler += time.perf_counter() - started
            if not names:
                break
            for name in names:
                results[name] = self.profiles[name].run(cycle, request, candidates)
        if not results:
            raise EppError(ErrorCode.INTERNAL, "profile handler ran no profile")
        started = time.perf_counter()
        primary = self.handler.primary_profile(results)
        self._observe(PROFILE_PICKER_POINT, self.handler, started - in_handler)
        primary_result = results.get(primary)
        if primary_result is None or not primary_result.endpoints:
            raise EppError(
                ErrorCode.RESOURCE_EXHAUSTED, "no endpoint passed the filters of profile " + primary
            )
        chosen = {k: v for k, v in results.items() if v is not None and v.endpoints}
        result = SchedulingResult(primary, chosen)
        if self._routing_headers is not None:
            result.headers = self._routing_headers.routing_headers(request, result)
        return result

    # --- request lifecycle (called by the director) ----------------------------------------------

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        for hook in self.pre_request_hooks:
            started = time.perf_counter()
            try:
                hook.pre_request(cycle, request, result)
            except Exception:
                log.exception("pre_request hook of %s failed", plugin_name(hook))
            self._observe(PRE_REQUEST_POINT, hook, started)

    def response_headers(
        self, request: InferenceRequest, result: SchedulingResult | None, endpoint: Endpoint
    ) -> dict[str, str]:
        """Headers the plugins add to the response the client sees (later plugins win)."""
        added: dict[str, str] = {}
        for hook in self.response_header_hooks:
            started = time.perf_counter()
            try:
                headers = hook.response_headers(request, result, endpoint)
                if headers:
                    added.update(headers)
            except Exception:
                log.exception("response_headers hook of %s failed", plugin_name(hook))
            self._observe(RESPONSE_RECEIVED_POINT, hook, started)
        return added

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        for hook in self.response_complete_hooks:
            started = time.perf_counter()
            try:
                hook.response_complete(request, endpoint)
            except Exception:
                log.exception("response_complete hook of %s failed", plugin_name(hook))
            self._observe(RESPONSE_COMPLETE_POINT, hook, started)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        for listener in self.endpoint_listeners:
            try:
                listener.endpoint_removed(endpoint)
            except Exception:
                log.exception("endpoint_removed hook of %s failed", plugin_name(listener))
