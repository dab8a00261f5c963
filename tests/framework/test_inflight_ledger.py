"""The in-flight ledger: one record of what epp routed and has not seen finish."""

from __future__ import annotations

from epp.framework import InFlightLedger
from epp.testing import make_endpoint, make_request


def counts(*endpoints: object) -> list[tuple[int, int]]:
    return [(ep.inflight_requests, ep.inflight_tokens) for ep in endpoints]  # type: ignore[attr-defined]


def test_charge_add_tokens_and_release() -> None:
    ledger = InFlightLedger()
    a, b = make_endpoint("a"), make_endpoint("b")
    r1, r2 = make_request("one"), make_request("two")
    ledger.charge(r1, [a, b])  # e.g. P/D: decode and prefill pod
    ledger.charge(r2, [a])
    ledger.add_tokens(r1, a, 100)
    ledger.add_tokens(r1, b, 40)
    ledger.add_tokens(r2, a, 7)
    assert counts(a, b) == [(2, 107), (1, 40)]
    assert len(ledger) == 2 and ledger.charged(r1) == [a, b]
    ledger.release(r1)
    assert counts(a, b) == [(1, 7), (0, 0)]
    ledger.release(r1)  # idempotent
    ledger.release(r2)
    assert counts(a, b) == [(0, 0), (0, 0)] and len(ledger) == 0


def test_tokens_for_an_endpoint_not_charged_are_ignored() -> None:
    ledger = InFlightLedger()
    a, b = make_endpoint("a"), make_endpoint("b")
    request = make_request()
    ledger.add_tokens(request, a, 5)  # not charged at all
    ledger.charge(request, [a])
    ledger.add_tokens(request, b, 5)  # charged elsewhere
    assert counts(a, b) == [(1, 0), (0, 0)]


def test_move_carries_requests_and_tokens_to_the_endpoint_that_served() -> None:
    ledger = InFlightLedger()
    planned, served, other = make_endpoint("p"), make_endpoint("s"), make_endpoint("o")
    request = make_request()
    ledger.charge(request, [planned])
    ledger.add_tokens(request, planned, 50)
    assert ledger.move(request, other, served) is False  # `other` carried no charge of it
    assert ledger.move(request, planned, served) is True
    assert counts(planned, served) == [(0, 0), (1, 50)]
    ledger.release(request)
    assert counts(planned, served) == [(0, 0), (0, 0)]
