"""Profile handlers: which profiles run for a request, and which one is the primary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from epp.framework import CycleState, InferenceRequest, Params, ProfileResult


class SingleProfileHandler:
    """Runs the one configured profile, once."""

    type_name: ClassVar[str] = "single-profile-handler"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        self.name = name

    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profile_names: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        return [] if results else list(profile_names[:1])

    def primary_profile(self, results: Mapping[str, ProfileResult | None]) -> str:
        return next(iter(results))


ALL_PROFILE_HANDLERS = (SingleProfileHandler,)
