"""`single-profile-handler`: run the one configured scheduling profile, once.

The default profile handler: when a config declares no handler, the loader uses this one. The
profile's result is the primary one (its first endpoint serves the request).

Consumes: nothing. Produces: nothing. Parameters: none. The config may define one profile only.

    plugins:
    - type: single-profile-handler
    - type: queue-scorer
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: queue-scorer
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp.framework import CycleState, InferenceRequest, ProfileHandler, ProfileResult


class SingleProfileHandler(ProfileHandler):
    """Runs the one configured profile, once; its result is the primary one."""

    type_name = "single-profile-handler"
    max_profiles = 1

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
