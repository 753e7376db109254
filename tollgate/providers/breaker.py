"""Circuit breakers: one per provider per worker process (DESIGN.md, "Resilience model").

A breaker watches the outcomes of one provider's calls and stops sending calls to a
provider that is down, so a retrying backlog does not hammer it:

* **closed**: calls go through. It opens when, over the last ``window`` calls (at least
  ``min_calls`` of them), the share of transient failures reaches ``failure_rate``, or
  after ``consecutive_failures`` transient failures in a row.
* **open**: calls are refused with :class:`ProviderCircuitOpen` (nothing is sent) for
  ``open_seconds``; ``retry_after()`` says how long is left.
* **half-open**: up to ``half_open_probes`` probe calls go through. When all of them
  succeed the breaker closes; any transient failure re-opens it for a fresh period.

Only transient failures count (timeouts, connection errors, 5xx/429, malformed answers).
A business answer (declined card, out of stock) means the provider is up: a success.

Each call holds a :class:`Permit` from :meth:`CircuitBreaker.before_call` and reports it
with :meth:`CircuitBreaker.record` (or :meth:`CircuitBreaker.abandon` when the outcome is
unknown, e.g. the activity was cancelled). A permit from an earlier state is ignored, so
a slow call that started before the breaker opened cannot close it, or use up a probe.

Breakers are not thread-safe: they live on the worker's event loop (every provider
activity is ``async``). The state gauge only reads them.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from tollgate.errors import ProviderUnavailable
from tollgate.settings import Settings

__all__ = [
    "STATE_METRIC",
    "BreakerConfig",
    "BreakerState",
    "Breakers",
    "CircuitBreaker",
    "Permit",
    "ProviderCircuitOpen",
]

Clock = Callable[[], float]

#: Name of the observable gauge: 0 closed, 1 half-open, 2 open; attribute ``provider``.
STATE_METRIC = "tollgate.breaker.state"
#: The shortest ``next_retry_delay`` handed to Temporal (a zero delay means "unset" there).
MIN_RETRY_DELAY_SECONDS = 0.01

_log = logging.getLogger("tollgate.breaker")


class BreakerState(enum.IntEnum):
    """Where a breaker stands; the value is what the state gauge reports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """``closed`` / ``half_open`` / ``open``, as logs show it."""
        return self.name.lower()


class ProviderCircuitOpen(ProviderUnavailable):
    """The provider's breaker is open: the call was refused without being sent.

    Retryable like any unavailability, but the caller should wait ``retry_after_seconds``
    (until the breaker lets probes through) rather than back off blindly.
    """

    def __init__(self, provider: str, retry_after_seconds: float) -> None:
        super().__init__(
            provider,
            f"circuit open; calls refused for the next {retry_after_seconds:.2f}s",
            code="circuit_open",
        )
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> dict[str, Any]:
        return {**super().details(), "retry_after_seconds": round(self.retry_after_seconds, 3)}

    def to_application_error(self) -> ApplicationError:
        """The Temporal form: retryable, benign, and retried when the breaker half-opens.

        ``activities.classified`` would make a plain retryable error of it (Temporal's
        backoff, not ours), so provider clients raise this form themselves.
        """
        delay = max(self.retry_after_seconds, MIN_RETRY_DELAY_SECONDS)
        return ApplicationError(
            str(self),
            self.details(),
            type=ProviderCircuitOpen.__name__,
            non_retryable=False,
            next_retry_delay=timedelta(seconds=delay),
            category=ApplicationErrorCategory.BENIGN,
        )


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of a breaker; see the module docs. Invalid values fail at construction."""

    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    consecutive_failures: int = 5
    open_seconds: float = 10.0
    half_open_probes: int = 2
    #: Retry hint for calls refused while the probes are in flight (their answer decides
    #: what happens next). None: ``open_seconds``.
    probe_wait_seconds: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.failure_rate <= 1:
            problems.append(f"failure_rate must be in (0, 1], not {self.failure_rate}")
        if self.window < 1:
            problems.append(f"window must be >= 1, not {self.window}")
        if not 1 <= self.min_calls <= self.window:
            problems.append(
                f"min_calls must be between 1 and window ({self.window}), not {self.min_calls}"
            )
        if self.consecutive_failures < 1:
            problems.append(f"consecutive_failures must be >= 1, not {self.consecutive_failures}")
        if self.open_seconds <= 0:
            problems.append(f"open_seconds must be > 0, not {self.open_seconds}")
        if self.half_open_probes < 1:
            problems.append(f"half_open_probes must be >= 1, not {self.half_open_probes}")
        if self.probe_wait_seconds is not None and self.probe_wait_seconds <= 0:
            problems.append(f"probe_wait_seconds must be > 0, not {self.probe_wait_seconds}")
        if problems:
            raise ValueError("invalid circuit breaker settings: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        """The ``breaker_*`` settings. Probes are waited for at most one provider timeout."""
        return cls(
            failure_rate=settings.breaker_failure_rate,
            window=settings.breaker_window,
            min_calls=settings.breaker_min_calls,
            consecutive_failures=settings.breaker_consecutive_failures,
            open_seconds=settings.breaker_open_seconds,
            half_open_probes=settings.breaker_half_open_probes,
            probe_wait_seconds=min(
                settings.provider_timeout_seconds, settings.breaker_open_seconds
            ),
        )


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call, issued in one state of the breaker (its ``generation``)."""

    generation: int
    probe: bool


class CircuitBreaker:
    """The breaker of one provider. ``clock`` returns seconds (default: monotonic time)."""

    def __init__(
        self,
        provider: str,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.provider = provider
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        #: Bumped on every transition; permits of an older generation are ignored.
        self._generation = 0
        #: Closed: the last ``window`` outcomes, True for a transient failure.
        self._outcomes: deque[bool] = deque(maxlen=self.config.window)
        self._consecutive = 0
        #: Open: when the open period ends.
        self._half_open_at = 0.0
        #: Half-open: probes let through, and how many of them succeeded.
        self._probes = 0
        self._probe_successes = 0

    # --- reading ---------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose period is over becomes half-open)."""
        self._advance()
        return self._state

    def peek(self) -> BreakerState:
        """The current state without changing anything (safe from the metrics thread)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._half_open_at:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_after(self) -> float:
        """Seconds until a call may be let through again.

        Open: the time left until half-open. Half-open with every probe in flight: the
        probe wait. Otherwise 0.
        """
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._half_open_at - self._clock())
        if state is BreakerState.HALF_OPEN and self._probes >= self.config.half_open_probes:
            return self.config.probe_wait_seconds or self.config.open_seconds
        return 0.0

    # --- calls -----------------------------------------------------------------------

    def before_call(self) -> Permit:
        """A permit for one call, or :class:`ProviderCircuitOpen` when calls are refused."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self._generation, probe=False)
        if state is BreakerState.HALF_OPEN and self._probes < self.config.half_open_probes:
            self._probes += 1
            return Permit(self._generation, probe=True)
        raise ProviderCircuitOpen(self.provider, self.retry_after())

    def record(self, permit: Permit, *, success: bool) -> None:
        """Report how the call went: ``success=False`` only for a transient failure."""
        self._advance()
        if permit.generation != self._generation:
            return  # issued before the last transition: says nothing about the present
        if self._state is BreakerState.CLOSED:
            self._record_closed(success)
        elif self._state is BreakerState.HALF_OPEN and permit.probe:
            if not success:
                self._open(reason="probe_failed")
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_probes:
                self._transition(BreakerState.CLOSED)

    def abandon(self, permit: Permit) -> None:
        """The call ended without an outcome (cancelled): give its probe slot back."""
        if (
            permit.probe
            and permit.generation == self._generation
            and self._state is BreakerState.HALF_OPEN
        ):
            self._probes -= 1

    # --- transitions -----------------------------------------------------------------

    def _record_closed(self, success: bool) -> None:
        self._outcomes.append(not success)
        if success:
            self._consecutive = 0
            return
        self._consecutive += 1
        calls, failures = len(self._outcomes), sum(self._outcomes)
        if self._consecutive >= self.config.consecutive_failures:
            self._open(reason="consecutive_failures", consecutive=self._consecutive)
        elif calls >= self.config.min_calls and failures / calls >= self.config.failure_rate:
            self._open(reason="failure_rate", failures=failures, calls=calls)

    def _open(self, **why: Any) -> None:
        self._half_open_at = self._clock() + self.config.open_seconds
        self._transition(BreakerState.OPEN, open_seconds=self.config.open_seconds, **why)

    def _advance(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() >= self._half_open_at:
            self._transition(BreakerState.HALF_OPEN)

    def _transition(self, to: BreakerState, **extra: Any) -> None:
        was = self._state
        self._state = to
        self._generation += 1
        self._outcomes.clear()
        self._consecutive = 0
        self._probes = 0
        self._probe_successes = 0
        _log.log(
            logging.WARNING if to is BreakerState.OPEN else logging.INFO,
            "circuit breaker %s: %s -> %s",
            self.provider,
            was.label,
            to.label,
            extra={"provider": self.provider, "from": was.label, "to": to.label, **extra},
        )


class Breakers:
    """The worker process's breakers: one per provider name, created on first use."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: BreakerConfig | None = None,
        clock: Clock = time.monotonic,
        meter: Meter | None = None,
    ) -> None:
        """Thresholds come from ``config``, else ``settings``, else the defaults.

        The state gauge goes to ``meter`` if given, else to the global meter provider
        (one gauge per process, reporting every live registry).
        """
        if config is None:
            config = BreakerConfig.from_settings(settings) if settings else BreakerConfig()
        self.config = config
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        if meter is not None:
            _create_gauge(meter, self._observe)
        else:
            _register_global(self)

    def get(self, provider: str) -> CircuitBreaker:
        """The breaker of ``provider``, created closed on first use."""
        breaker = self._breakers.get(provider)
        if breaker is None:
            breaker = CircuitBreaker(provider, self.config, clock=self._clock)
            self._breakers[provider] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        """Every breaker's state, by provider (read-only)."""
        return {name: b.peek() for name, b in list(self._breakers.items())}

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(state), {"provider": name}) for name, state in self.states().items()
        ]


def _create_gauge(
    meter: Meter, callback: Callable[[CallbackOptions], Iterable[Observation]]
) -> None:
    meter.create_observable_gauge(
        STATE_METRIC,
        callbacks=[callback],
        unit="1",
        description="Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
    )


_registries: weakref.WeakSet[Breakers] = weakref.WeakSet()
_registries_lock = threading.Lock()
_global_gauge = False


def _register_global(registry: Breakers) -> None:
    global _global_gauge
    with _registries_lock:
        _registries.add(registry)
        if not _global_gauge:
            _create_gauge(metrics.get_meter("tollgate.breaker"), _observe_global)
            _global_gauge = True


def _observe_global(options: CallbackOptions) -> Iterable[Observation]:
    with _registries_lock:
        registries = list(_registries)
    return [obs for registry in registries for obs in registry._observe(options)]
