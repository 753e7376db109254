"""The circuit breaker's state machine, driven by a fake clock (no I/O, no sleeping)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from temporalio.exceptions import ApplicationErrorCategory

from tollgate.errors import ProviderUnavailable
from tollgate.providers.breaker import (
    STATE_METRIC,
    BreakerConfig,
    Breakers,
    BreakerState,
    CircuitBreaker,
    ProviderCircuitOpen,
)
from tollgate.settings import Settings

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **overrides: float) -> CircuitBreaker:
    fields: dict[str, float] = {
        "failure_rate": 0.5,
        "window": 10,
        "min_calls": 6,
        "consecutive_failures": 100,  # off unless a test turns it on
        "open_seconds": 10.0,
        "half_open_probes": 2,
    }
    fields.update(overrides)
    return CircuitBreaker("payments", BreakerConfig(**fields), clock=clock)  # type: ignore[arg-type]


def call(breaker: CircuitBreaker, *, success: bool) -> None:
    """One call from permit to outcome."""
    breaker.record(breaker.before_call(), success=success)


def run(breaker: CircuitBreaker, outcomes: str) -> None:
    """``outcomes``: ``s`` for a success, ``f`` for a transient failure, in order."""
    for o in outcomes:
        call(breaker, success=o == "s")


def open_breaker(breaker: CircuitBreaker) -> None:
    """Fail calls until the breaker opens (at most a window's worth)."""
    for _ in range(breaker.config.window):
        call(breaker, success=False)
        if breaker.state is OPEN:
            return
    raise AssertionError("a window of failures did not open the breaker")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- closed -> open ------------------------------------------------------------------


def test_opens_when_the_failure_rate_over_the_window_reaches_the_threshold(
    clock: FakeClock,
) -> None:
    b = make(clock)
    run(b, "sfsfs")  # 2 of 5 failed; too few calls to judge anyway
    assert b.state is CLOSED
    run(b, "s")  # 6 calls, 2 failed = 33%
    assert b.state is CLOSED
    run(b, "f")  # 7 calls, 3 failed = 43%
    assert b.state is CLOSED
    run(b, "f")  # 8 calls, 4 failed = 50%
    assert b.state is OPEN


def test_the_window_forgets_calls_older_than_its_size(clock: FakeClock) -> None:
    b = make(clock, window=4, min_calls=4)
    run(b, "ffsss")  # window now f s s s: 25%
    assert b.state is CLOSED
    run(b, "f")  # s s s f: 25% (the old failures slid out)
    assert b.state is CLOSED
    run(b, "f")  # s s f f: 50%
    assert b.state is OPEN


def test_does_not_open_below_min_calls_even_when_every_call_failed(clock: FakeClock) -> None:
    b = make(clock, min_calls=6)
    run(b, "fffff")
    assert b.state is CLOSED
    b.before_call()  # still lets calls through
    run(b, "f")
    assert b.state is OPEN


def test_opens_after_consecutive_failures_whatever_the_rate(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=3, min_calls=10, window=10)
    run(b, "ff")
    assert b.state is CLOSED
    run(b, "f")
    assert b.state is OPEN


def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    b = make(clock, consecutive_failures=3, min_calls=10, window=10, failure_rate=1.0)
    run(b, "ffsffsff")
    assert b.state is CLOSED, "never three in a row"
    run(b, "f")
    assert b.state is OPEN


# --- open ----------------------------------------------------------------------------


def test_open_fails_fast_with_the_time_left_until_half_open(clock: FakeClock) -> None:
    b = make(clock, open_seconds=10.0)
    open_breaker(b)
    clock.advance(3.5)
    with pytest.raises(ProviderCircuitOpen) as caught:
        b.before_call()
    assert isinstance(caught.value, ProviderUnavailable), "retryable like any outage"
    assert caught.value.provider == "payments"
    assert caught.value.retry_after_seconds == pytest.approx(6.5)
    assert b.retry_after() == pytest.approx(6.5)
    clock.advance(6.0)
    assert b.retry_after() == pytest.approx(0.5)
    assert b.state is OPEN


def test_circuit_open_becomes_a_benign_retryable_error_with_the_delay() -> None:
    err = ProviderCircuitOpen("push", 2.25).to_application_error()
    assert err.type == "ProviderCircuitOpen"
    assert err.non_retryable is False
    assert err.category is ApplicationErrorCategory.BENIGN
    assert err.next_retry_delay == timedelta(seconds=2.25)
    assert err.details[0]["provider"] == "push"


def test_late_results_of_calls_admitted_before_opening_are_ignored(clock: FakeClock) -> None:
    b = make(clock, half_open_probes=1, consecutive_failures=2, min_calls=10)
    slow = b.before_call()
    open_breaker(b)
    clock.advance(10.0)
    probe = b.before_call()
    b.record(probe, success=True)
    assert b.state is CLOSED
    call(b, success=False)
    b.record(slow, success=False)  # admitted in an earlier closed period: not counted
    assert b.state is CLOSED, "only one failure of this closed period"
    call(b, success=False)
    assert b.state is OPEN


def test_a_late_probe_from_an_earlier_half_open_is_not_a_probe_now(clock: FakeClock) -> None:
    b = make(clock, half_open_probes=2)
    open_breaker(b)
    clock.advance(10.0)
    first, late = b.before_call(), b.before_call()
    b.record(first, success=False)  # re-opens; ``late`` is still in flight
    clock.advance(10.0)
    probe = b.before_call()
    b.record(late, success=True)
    b.record(probe, success=True)
    assert b.state is HALF_OPEN, "one probe of this half-open succeeded, not two"
    b.record(b.before_call(), success=True)
    assert b.state is CLOSED


# --- half-open -----------------------------------------------------------------------


def test_half_open_admits_exactly_the_configured_number_of_probes(clock: FakeClock) -> None:
    b = make(clock, half_open_probes=2, open_seconds=10.0)
    open_breaker(b)
    clock.advance(10.0)
    assert b.state is HALF_OPEN
    first, second = b.before_call(), b.before_call()
    assert first.probe and second.probe
    with pytest.raises(ProviderCircuitOpen) as caught:
        b.before_call()
    assert caught.value.retry_after_seconds > 0
    # a probe that ends without an outcome (cancelled) gives its slot back
    b.abandon(first)
    third = b.before_call()
    assert third.probe
    with pytest.raises(ProviderCircuitOpen):
        b.before_call()


def test_all_probes_succeeding_closes_it(clock: FakeClock) -> None:
    b = make(clock, half_open_probes=2)
    open_breaker(b)
    clock.advance(10.0)
    first, second = b.before_call(), b.before_call()
    b.record(first, success=True)
    assert b.state is HALF_OPEN, "one of two probes is not enough"
    b.record(second, success=True)
    assert b.state is CLOSED
    assert b.retry_after() == 0.0
    # closed afresh: the failures that opened it are forgotten
    run(b, "fffff")
    assert b.state is CLOSED


def test_a_failing_probe_reopens_it_for_a_fresh_period(clock: FakeClock) -> None:
    b = make(clock, half_open_probes=2, open_seconds=10.0)
    open_breaker(b)
    clock.advance(12.0)
    first, second = b.before_call(), b.before_call()
    b.record(first, success=True)
    clock.advance(1.0)
    b.record(second, success=False)
    assert b.state is OPEN
    assert b.retry_after() == pytest.approx(10.0), "a fresh open period, from now"
    with pytest.raises(ProviderCircuitOpen):
        b.before_call()
    clock.advance(9.9)
    assert b.state is OPEN
    clock.advance(0.1)
    assert b.state is HALF_OPEN


def test_business_outcomes_count_as_successes(clock: FakeClock) -> None:
    """The caller reports a declined card as a success: the provider answered."""
    b = make(clock, consecutive_failures=2, min_calls=4, window=4, failure_rate=0.75)
    run(b, "fsfsfs")  # the s are declines: provider up (50% < 75%, never 2 in a row)
    assert b.state is CLOSED
    run(b, "ff")
    assert b.state is OPEN


# --- logging and metrics -------------------------------------------------------------


def test_each_transition_is_logged_once(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tollgate.breaker")
    b = make(clock, half_open_probes=1)
    run(b, "s" * 20)
    open_breaker(b)
    for _ in range(5):  # refused calls and state reads log nothing
        with pytest.raises(ProviderCircuitOpen):
            b.before_call()
    clock.advance(10.0)
    for _ in range(3):
        assert b.state is HALF_OPEN
    call(b, success=False)  # probe fails: open again
    clock.advance(10.0)
    call(b, success=True)  # probe succeeds: closed
    run(b, "s" * 5)

    records = [r for r in caplog.records if r.name == "tollgate.breaker"]
    assert [(r.__dict__["from"], r.__dict__["to"]) for r in records] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert all(r.__dict__["provider"] == "payments" for r in records)
    assert [r.levelno for r in records if r.__dict__["to"] == "open"] == [logging.WARNING] * 2
    assert records[0].__dict__["reason"] == "failure_rate"
    assert records[2].__dict__["reason"] == "probe_failed"


def test_state_is_published_as_a_gauge_per_provider(clock: FakeClock) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    settings = Settings(breaker_consecutive_failures=2, breaker_open_seconds=5.0)
    breakers = Breakers(settings, clock=clock, meter=provider.get_meter("test"))

    def gauge() -> dict[str, int]:
        data = reader.get_metrics_data()
        assert data is not None
        return {
            str(point.attributes["provider"]): int(point.value)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == STATE_METRIC
            for point in metric.data.data_points
            if isinstance(point, NumberDataPoint) and point.attributes
        }

    payments = breakers.get("payments")
    breakers.get("push")
    assert breakers.get("payments") is payments, "one breaker per provider"
    assert gauge() == {"payments": 0, "push": 0}
    run(payments, "ff")
    assert gauge() == {"payments": 2, "push": 0}
    clock.advance(5.0)
    assert gauge() == {"payments": 1, "push": 0}
    call(payments, success=True)
    call(payments, success=True)  # settings' default: 2 probes
    assert gauge() == {"payments": 0, "push": 0}
    provider.shutdown()


def test_breakers_take_their_thresholds_from_settings() -> None:
    # ints and floats, as the fields are; Settings and BreakerConfig each check their own
    thresholds: dict[str, Any] = {
        "failure_rate": 0.25,
        "window": 8,
        "min_calls": 4,
        "consecutive_failures": 3,
        "open_seconds": 7.0,
        "half_open_probes": 1,
    }
    settings = Settings(
        **{f"breaker_{name}": value for name, value in thresholds.items()},
        provider_timeout_seconds=2.0,
    )
    config = Breakers(settings).get("email").config
    # Each BREAKER_<NAME> setting is the config's <name>; calls refused while the probes are
    # out are told to come back once a provider call has timed out (here sooner than 7 s).
    assert config == BreakerConfig(**thresholds, probe_wait_seconds=2.0)


def test_inconsistent_thresholds_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="min_calls"):
        Breakers(Settings(breaker_window=5, breaker_min_calls=10))
