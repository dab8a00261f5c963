"""Admission without flow control (Go's legacy controller): only sheddable requests on a
saturated pool are refused, and the request path skips admission until an objective is
sheddable."""

from __future__ import annotations

import time

import pytest

from epp.discovery.objectives import ObjectiveStore
from epp.errors import EppError
from epp.flowcontrol.admission import Admission
from epp.testing import make_endpoint
from epp_scorers.saturation_detectors.utilization import UtilizationDetector


async def test_sheddable_requests_are_refused_while_saturated() -> None:
    store = ObjectiveStore()
    endpoints = [make_endpoint(waiting=10, updated_at=time.monotonic())]  # queue 10 / 5: saturated
    admission = Admission(store, UtilizationDetector(), None, lambda: endpoints)
    seen: list[bool] = []
    admission.on_active = seen.append
    assert not admission.active  # nothing is sheddable: the request path skips admission
    store.replace({"batch": -1, "chat": 5})
    assert admission.active and seen == [True]
    with pytest.raises(EppError) as refused:
        await admission.admit({"x-llm-d-inference-objective": "batch"}, 10, "r1")
    assert refused.value.code.http_status == 429 and refused.value.dropped_reason == "rejected-saturated"
    assert await admission.admit({"x-llm-d-inference-objective": "chat"}, 10, "r2") == 5
    endpoints[0] = make_endpoint(waiting=0, updated_at=time.monotonic())  # not saturated any more
    assert await admission.admit({"x-llm-d-inference-objective": "batch"}, 10, "r3") == -1
    store.delete("batch")
    assert not admission.active and seen == [True, False]
