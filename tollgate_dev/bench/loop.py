"""The closed loop: keep N lifecycles in flight, start the next as soon as one ends.

A closed loop measures what the system sustains at a given concurrency: latency is each
run's own time from its start call to its end, and throughput is the rate at which runs
ended as expected while the loop was full (:func:`steady_rate`). Unlike an open loop at
a fixed rate it never queues work the system cannot take, so latency at 40 in flight is
the system's, not a backlog's.

A level of the bench is made of several passes of the loop (:class:`Pass`), taken in
turns with the other scenarios', and read together by :func:`level_of`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tollgate_dev.bench.models import Level
from tollgate_dev.load import percentile

#: One run: start lifecycle ``n``, wait for its end, return its final status.
Run = Callable[[int], Awaitable[str]]


@dataclass
class Pass:
    """What one closed loop saw: every run's latency and outcome, and the loop's
    window of steady state (see :func:`steady_window`)."""

    in_flight: int
    runs: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    #: Runs that ended while the loop was full, and for how long it was (0: too short).
    steady_runs: int = 0
    steady_seconds: float = 0.0


async def closed_loop(
    run: Run, *, runs: int, in_flight: int, expected: str, first: int = 0
) -> Pass:
    """Run lifecycles ``first`` to ``first + runs - 1`` with ``in_flight`` of them going
    at all times."""
    numbers = itertools.count(first)
    end = first + runs
    loop = Pass(in_flight=in_flight, runs=runs)
    ended: list[float] = []
    last_start = 0.0

    async def lane() -> None:
        nonlocal last_start
        while (n := next(numbers)) < end:
            started = last_start = time.perf_counter()
            try:
                status = await run(n)
            except Exception as exc:  # counted and shown: one failure must not end a run
                loop.outcomes[f"error:{type(exc).__name__}"] += 1
                continue
            loop.outcomes[status] += 1
            if status == expected:
                ended.append(time.perf_counter())
                loop.latencies.append((ended[-1] - started) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(in_flight, runs))))
    loop.seconds = time.perf_counter() - began
    loop.steady_runs, loop.steady_seconds = steady_window(ended, in_flight, last_start)
    return loop


def level_of(passes: Sequence[Pass]) -> Level:
    """One level from its passes: latencies pooled, throughput over the passes' steady
    windows together (over their whole loops when none had one)."""
    latencies = [ms for p in passes for ms in p.latencies]
    outcomes: Counter[str] = Counter()
    for p in passes:
        outcomes.update(p.outcomes)
    seconds = sum(p.seconds for p in passes)
    steady_seconds = sum(p.steady_seconds for p in passes)
    whole_loop = len(latencies) / seconds if seconds > 0 else 0.0
    steady = sum(p.steady_runs for p in passes) / steady_seconds if steady_seconds else None

    def ms(p: float) -> float:
        value = percentile(latencies, p)
        return round(value, 1) if value is not None else 0.0

    return Level(
        in_flight=passes[0].in_flight,
        runs=sum(p.runs for p in passes),
        passes=len(passes),
        ok=len(latencies),
        outcomes=dict(sorted(outcomes.items())),
        seconds=round(seconds, 3),
        throughput_per_s=round(steady or whole_loop, 2),
        loop_throughput_per_s=round(whole_loop, 2),
        p50_ms=ms(50),
        p95_ms=ms(95),
        p99_ms=ms(99),
    )


def steady_window(ended: list[float], in_flight: int, last_start: float) -> tuple[int, float]:
    """How many runs ended while the loop was full, and over how many seconds: from the
    end of the first wave (the ``in_flight``-th end) to the start of the last run, after
    which fewer and fewer runs are in flight. Counting the drain as well would let the
    slowest of the last runs decide the rate: one straggler of 3 s at the end of a 6 s
    loop takes a third off it. ``(0, 0.0)`` when that window holds too few ends to say
    (a quick run)."""
    ends = sorted(ended)
    if len(ends) <= in_flight:
        return 0, 0.0
    opened = ends[in_flight - 1]
    inside = [t for t in ends[in_flight:] if t <= last_start]
    if len(inside) < max(in_flight, 10) or last_start <= opened:
        return 0, 0.0
    return len(inside), last_start - opened


def steady_rate(ended: list[float], in_flight: int, last_start: float) -> float | None:
    """Runs ended per second while the loop was full (see :func:`steady_window`); None
    when the loop was too short to tell."""
    runs, seconds = steady_window(ended, in_flight, last_start)
    return runs / seconds if seconds else None
