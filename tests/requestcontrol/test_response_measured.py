"""The director's hooks for data-driven plugins: ResponseMeasured gets what epp measured of a
completed response, and admitters run after the data producers (Go's order) with their data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from epp.datalayer.datastore import Datastore
from epp.errors import EppError, ErrorCode
from epp.framework import (
    Admitter,
    CycleState,
    Endpoint,
    InferenceRequest,
    ResponseComplete,
    ResponseMeasured,
    ResponseStats,
)
from epp.observability import EppMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.loader import DEFAULT_CONFIG
from epp.testing import load_scheduler, make_endpoint, make_request
from epp_scorers.data import PREFIX_MATCH


class Recorder(ResponseMeasured, ResponseComplete):
    type_name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, ResponseStats | None]] = []

    def response_measured(self, request: InferenceRequest, endpoint: Endpoint, stats: ResponseStats) -> None:
        self.calls.append(("measured", endpoint.name, stats))

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self.calls.append(("complete", endpoint.name, None))


class PrefixReadingAdmitter(Admitter):
    """Refuses when the prefix producer's data is missing from the cycle it is given."""

    type_name = "prefix-reading-admitter"

    def admit(self, request: InferenceRequest, priority: int, endpoints: Sequence[Endpoint]) -> str | None:
        return "called without the producers' data"

    def admit_with_data(
        self, cycle: CycleState, request: InferenceRequest, priority: int, endpoints: Sequence[Endpoint]
    ) -> str | None:
        return None if cycle.read(PREFIX_MATCH) is not None else "no prefix match in the cycle"


def director_with(endpoint: Endpoint) -> Director:
    endpoint.metrics = type(endpoint.metrics)(updated_at=time.monotonic())
    store = Datastore()
    store.replace_all([endpoint])
    scheduler = load_scheduler(DEFAULT_CONFIG)
    return Director(store, scheduler, EppMetrics(), scheduler.handle.ledger)


async def test_a_completed_response_is_measured_once_before_it_completes() -> None:
    director = director_with(make_endpoint("a"))
    recorder = Recorder()
    director.scheduler.add_plugin(recorder)
    decision = director.schedule(make_request("hi", body={"stream": True}), None)
    await asyncio.sleep(0)  # the pre_request hooks
    decision.started -= 0.1  # it arrived 100 ms ago; its chunks came at 50 and 60 ms
    started = decision.started
    decision.response_chunk(10, started + 0.05)
    decision.response_chunk(10, started + 0.06)
    decision.usage.completion_tokens = 11
    decision.usage.prompt_tokens = 3
    director.release(decision, completed=True)
    director.release(decision, completed=True)  # idempotent
    assert [(kind, name) for kind, name, _ in recorder.calls] == [("measured", "a"), ("complete", "a")]
    stats = recorder.calls[0][2]
    assert stats is not None and stats.streaming
    assert stats.first_chunk_s == pytest.approx(0.05)
    assert stats.e2e_s >= 0.1
    assert (stats.output_tokens, stats.input_tokens) == (11, 3)


async def test_a_stream_that_went_away_is_not_measured() -> None:
    director = director_with(make_endpoint("a"))
    recorder = Recorder()
    director.scheduler.add_plugin(recorder)
    decision = director.schedule(make_request("hi"), None)
    await asyncio.sleep(0)
    director.release(decision, completed=False)
    assert [kind for kind, _, _ in recorder.calls] == ["complete"]


async def test_admitters_run_after_the_data_producers_and_read_their_data() -> None:
    director = director_with(make_endpoint("a"))
    director.admitters = [PrefixReadingAdmitter()]
    decision = director.schedule(make_request("a prompt long enough to hash " * 20), None)
    assert decision.endpoints[0].name == "a"

    class Refuses(PrefixReadingAdmitter):
        def admit_with_data(
            self, cycle: CycleState, request: InferenceRequest, priority: int, endpoints: Sequence[Endpoint]
        ) -> str | None:
            return "full"

    director.admitters = [Refuses()]
    with pytest.raises(EppError) as err:
        director.schedule(make_request("another"), None)
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED and err.value.dropped_reason == "rejected-saturated"
