"""The scheduler: runs the data producers, asks the profile handler which profiles to run, runs
them, and returns the result. It also runs the request-lifecycle hooks of its plugins for the
director, timing each one into the plugin-duration histogram."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from epp.framework import (
    CycleState,
    DataKey,
    DataProducer,
    Endpoint,
    EndpointListener,
    EppError,
    ErrorCode,
    InferenceRequest,
    LogLimiter,
    Plugin,
    PluginHandle,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    ResponseComplete,
    ResponseHeaders,
    ResponseMeasured,
    ResponseStats,
    SchedulingResult,
    ServedElsewhere,
)
from epp.scheduling.profile import PluginSeries, PluginTimer, SchedulerProfile, series_of
from epp.tracing import ProfileRun

log = logging.getLogger(__name__)
# A plugin hook that fails fails on every request: its tracebacks are logged at most this many
# times per this many seconds (per scheduler), then one line says how many were suppressed.
HOOK_ERROR_LOG_BURST = 5
HOOK_ERROR_LOG_INTERVAL_S = 30.0

_MAX_ROUNDS = 8  # a handler that never stops asking must not hang a request

# Extension points, as the `extension_point` label of the plugin-duration histogram.
DATA_PRODUCER_POINT = "DataProducer"
PROFILE_PICKER_POINT = "ProfilePicker"  # each pick_profiles round
PROCESS_RESULTS_POINT = "ProcessProfilesResults"  # primary_profile and routing_headers
PRE_REQUEST_POINT = "PreRequest"
RESPONSE_RECEIVED_POINT = "ResponseReceived"
RESPONSE_COMPLETE_POINT = "ResponseComplete"

P = TypeVar("P", bound=Plugin)

# With `Scheduler.trace_profiles` on, each profile run, timed for its trace span (epp.tracing).
PROFILE_RUNS: DataKey[list[ProfileRun]] = DataKey("profile-runs", "scheduler")


class Scheduler:
    def __init__(
        self,
        handler: ProfileHandler,
        profiles: Mapping[str, SchedulerProfile],
        plugins: Sequence[Plugin] = (),
        timer: PluginTimer | None = None,
        handle: PluginHandle | None = None,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.handler = handler
        self.profiles = dict(profiles)
        self._profile_names = list(self.profiles)
        self._hook_errors = LogLimiter(log, HOOK_ERROR_LOG_BURST, HOOK_ERROR_LOG_INTERVAL_S)
        self.trace_profiles = False  # record PROFILE_RUNS in the cycle state (tracing is on)
        self.plugins = list(plugins)
        # What the plugins were built with: their metrics registry and the in-flight ledger.
        self.handle = handle or PluginHandle()
        self._timer = timer
        self._picker_series = series_of(timer, PROFILE_PICKER_POINT, handler)
        self._results_series = series_of(timer, PROCESS_RESULTS_POINT, handler)
        self._resolve_hooks()

    def add_plugin(self, plugin: Plugin) -> None:
        """One more plugin whose hooks run (after the others'), e.g. a test's recorder."""
        self.plugins.append(plugin)
        self._resolve_hooks()

    def _resolve_hooks(self) -> None:
        """Every hook resolved once, by the base class the plugin derives from, with the series
        of the plugin-duration histogram its time goes to."""

        def of(kind: type[P]) -> list[P]:
            return [p for p in self.plugins if isinstance(p, kind)]

        def timed(point: str, kind: type[P]) -> list[tuple[P, PluginSeries]]:
            return [(p, series_of(self._timer, point, p)) for p in of(kind)]

        self.producers = of(DataProducer)
        self.pre_request_hooks = of(PreRequest)
        self.response_header_hooks = of(ResponseHeaders)
        self.served_elsewhere_hooks = of(ServedElsewhere)
        self.response_measured_hooks = of(ResponseMeasured)
        self.response_complete_hooks = of(ResponseComplete)
        self.endpoint_listeners = of(EndpointListener)
        self._timed_producers = timed(DATA_PRODUCER_POINT, DataProducer)
        self._timed_pre_request = timed(PRE_REQUEST_POINT, PreRequest)
        self._timed_response_headers = timed(RESPONSE_RECEIVED_POINT, ResponseHeaders)
        self._timed_served_elsewhere = timed(RESPONSE_RECEIVED_POINT, ServedElsewhere)
        self._timed_response_measured = timed(RESPONSE_COMPLETE_POINT, ResponseMeasured)
        self._timed_response_complete = timed(RESPONSE_COMPLETE_POINT, ResponseComplete)

    def schedule(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> SchedulingResult:
        self.produce(cycle, request, candidates)
        return self.run_profiles(cycle, request, candidates)

    def produce(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None:
        """The data producers (the first half of `schedule`; admitters run after it)."""
        for producer, series in self._timed_producers:
            started = time.perf_counter()
            producer.produce(cycle, request, candidates)
            series.observe(time.perf_counter() - started)

    def run_profiles(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> SchedulingResult:
        """The profiles, once the producers ran (the second half of `schedule`)."""
        results: dict[str, ProfileResult | None] = {}
        handler = self.handler
        runs: list[ProfileRun] | None = None
        if self.trace_profiles:
            runs = []
            cycle.write(PROFILE_RUNS, runs)
        for _ in range(_MAX_ROUNDS):
            started = time.perf_counter()
            names = handler.pick_profiles(cycle, request, self._profile_names, results)
            self._picker_series.observe(time.perf_counter() - started)
            if not names:
                break
            for name in names:
                if runs is None:
                    results[name] = self.profiles[name].run(cycle, request, candidates)
                else:
                    start_ns = time.time_ns()
                    run = results[name] = self.profiles[name].run(cycle, request, candidates)
                    runs.append((name, start_ns, time.time_ns(), run))
        if not results:
            raise EppError(ErrorCode.INTERNAL, "profile handler ran no profile")
        started = time.perf_counter()
        primary = handler.primary_profile(results)
        primary_result = results.get(primary)
        if primary_result is None or not primary_result.endpoints:
            raise EppError(
                ErrorCode.RESOURCE_EXHAUSTED, "no endpoint passed the filters of profile " + primary
            )
        chosen = {k: v for k, v in results.items() if v is not None and v.endpoints}
        result = SchedulingResult(primary, chosen)
        result.headers = handler.routing_headers(request, result)
        self._results_series.observe(time.perf_counter() - started)
        return result

    # --- request lifecycle (called by the director) ----------------------------------------------

    def _each(self, point: str, hooks: Sequence[tuple[P, PluginSeries]], call: Callable[[P], object]) -> None:
        """Run one hook of every plugin that has it; a failing plugin is logged (rate-limited),
        never fatal."""
        for hook, series in hooks:
            started = time.perf_counter()
            try:
                call(hook)
            except Exception:
                self._hook_errors.log(
                    logging.ERROR, "%s hook of plugin %s failed", point, hook.name, exc_info=True
                )
            series.observe(time.perf_counter() - started)

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        self._each(
            PRE_REQUEST_POINT, self._timed_pre_request, lambda h: h.pre_request(cycle, request, result)
        )

    def response_headers(
        self, request: InferenceRequest, result: SchedulingResult | None, endpoint: Endpoint
    ) -> dict[str, str]:
        """Headers the plugins add to the response the client sees (later plugins win)."""
        added: dict[str, str] = {}

        def run(hook: ResponseHeaders) -> None:
            headers = hook.response_headers(request, result, endpoint)
            if headers:
                added.update(headers)

        self._each(RESPONSE_RECEIVED_POINT, self._timed_response_headers, run)
        return added

    def served_elsewhere(self, request: InferenceRequest, planned: Endpoint, served: Endpoint) -> None:
        self._each(
            RESPONSE_RECEIVED_POINT,
            self._timed_served_elsewhere,
            lambda h: h.served_elsewhere(request, planned, served),
        )

    def response_measured(self, request: InferenceRequest, endpoint: Endpoint, stats: ResponseStats) -> None:
        self._each(
            RESPONSE_COMPLETE_POINT,
            self._timed_response_measured,
            lambda h: h.response_measured(request, endpoint, stats),
        )

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self._each(
            RESPONSE_COMPLETE_POINT,
            self._timed_response_complete,
            lambda h: h.response_complete(request, endpoint),
        )

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        for listener in self.endpoint_listeners:
            try:
                listener.endpoint_removed(endpoint)
            except Exception:
                log.exception("endpoint_removed hook of plugin %s failed", listener.name)
