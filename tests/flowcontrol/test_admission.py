"""Admission without flow control (Go's legacy controller): only sheddable requests on a
saturated pool are refused, and the request path skips admission until an objective is
sheddable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from epp.app import App
from epp.discovery.objectives import ObjectiveStore
from epp.errors import EppError
from epp.flowcontrol.admission import Admission
from epp.settings import parse_settings
from epp.testing import make_endpoint
from epp_scorers.saturation_detectors.utilization import UtilizationDetector

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
SCORER = "plugins:\n- type: queue-scorer\n"


async def test_sheddable_requests_are_refused_while_saturated() -> None:
    store = ObjectiveStore()
    endpoints = [make_endpoint(waiting=10, updated_at=time.monotonic())]  # queue 10 / 5: saturated
    admission = Admission(store, UtilizationDetector(), None, lambda: endpoints)
    seen: list[bool] = []
    admission.listeners.append(seen.append)
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


@pytest.mark.parametrize(
    ("priority", "gate", "detector", "idle_polling"),
    [
        (None, False, "", True),  # nothing sheddable, no flow control: idle endpoints polled slowly (opt-in)
        (-1, False, "", False),  # the default utilization-detector sheds: it needs fresh metrics
        (1, True, "", False),  # flow control on the default utilization-detector
        (-1, True, "concurrency-detector", True),  # epp's own counts: no scraped metrics read
    ],
)
def test_idle_endpoints_are_polled_every_interval_when_a_detector_reads_their_age(
    tmp_path: Path, priority: int | None, gate: bool, detector: str, idle_polling: bool
) -> None:
    flags = ["--endpoints", "127.0.0.1:9", "--secure-serving=false", "--idle-refresh-metrics-interval=1s"]
    if priority is not None:
        path = tmp_path / "objectives.yaml"
        path.write_text(f"kind: InferenceObjective\nmetadata: {{name: o}}\nspec: {{priority: {priority}}}\n")
        flags += ["--inference-objectives-file", str(path)]
    text = HEAD + ("featureGates: [flowControl]\n" if gate else "") + SCORER
    if detector:
        text += f"- type: {detector}\nflowControl: {{saturationDetector: {{pluginRef: {detector}}}}}\n"
    app = App(parse_settings([*flags, "--config-text", text]))
    assert (app.scraper.idle_interval_s > 0) is idle_polling
