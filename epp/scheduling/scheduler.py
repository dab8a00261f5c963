"""The scheduler: asks the profile handler which profiles to run, runs them, returns the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from epp.errors import EppError, ErrorCode
from epp.framework import (
    CycleState,
    Endpoint,
    EndpointListener,
    InferenceRequest,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    ResponseComplete,
    SchedulingResult,
)
from epp.scheduling.profile import SchedulerProfile

_MAX_ROUNDS = 8  # a handler that never stops asking must not hang a request


class Scheduler:
    def __init__(
        self, handler: ProfileHandler, profiles: Mapping[str, SchedulerProfile], plugins: Sequence[Any] = ()
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.handler = handler
        self.profiles = dict(profiles)
        self._profile_names = list(self.profiles)
        # Lifecycle hooks, resolved once from every plugin instance.
        self.plugins = list(plugins)
        self.pre_request_hooks = [p for p in self.plugins if isinstance(p, PreRequest)]
        self.response_complete_hooks = [p for p in self.plugins if isinstance(p, ResponseComplete)]
        self.endpoint_listeners = [p for p in self.plugins if isinstance(p, EndpointListener)]

    def schedule(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> SchedulingResult:
        results: dict[str, ProfileResult | None] = {}
        for _ in range(_MAX_ROUNDS):
            names = self.handler.pick_profiles(cycle, request, self._profile_names, results)
            if not names:
                break
            for name in names:
                results[name] = self.profiles[name].run(cycle, request, candidates)
        if not results:
            raise EppError(ErrorCode.INTERNAL, "profile handler ran no profile")
        primary = self.handler.primary_profile(results)
        primary_result = results.get(primary)
        if primary_result is None or not primary_result.endpoints:
            raise EppError(
                ErrorCode.RESOURCE_EXHAUSTED, "no endpoint passed the filters of profile " + primary
            )
        return SchedulingResult(primary, {k: v for k, v in results.items() if v is not None and v.endpoints})

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        for listener in self.endpoint_listeners:
            listener.endpoint_removed(endpoint)
