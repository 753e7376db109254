"""The closed loop: keep N lifecycles in flight, start the next as soon as one ends.

A closed loop measures what the system sustains at a given concurrency: latency is each
run's own time from its start call to its end, and throughput is the rate at which runs
ended as expected while the loop was full (:func:`steady_rate`). Unlike an open loop at
a fixed rate it never queues work the system cannot take, so latency at 40 in flight is
the system's, not a backlog's.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from tollgate_dev.bench.models import Level
from tollgate_dev.load import percentile

#: One run: start lifecycle ``n``, wait for its end, return its final status.
Run = Callable[[int], Awaitable[str]]


async def closed_loop(run: Run, *, runs: int, in_flight: int, expected: str) -> Level:
    """Run ``runs`` lifecycles with ``in_flight`` of them going at all times."""
    numbers = itertools.count()
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    ended: list[float] = []
    last_start = 0.0

    async def lane() -> None:
        nonlocal last_start
        while (n := next(numbers)) < runs:
            started = last_start = time.perf_counter()
            try:
                status = await run(n)
            except Exception as exc:  # counted and shown: one failure must not end a run
                outcomes[f"error:{type(exc).__name__}"] += 1
                continue
            outcomes[status] += 1
            if status == expected:
                ended.append(time.perf_counter())
                latencies.append((ended[-1] - started) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(in_flight, runs))))
    seconds = time.perf_counter() - began
    whole_loop = len(latencies) / seconds if seconds > 0 else 0.0

    def ms(p: float) -> float:
        value = percentile(latencies, p)
        return round(value, 1) if value is not None else 0.0

    return Level(
        in_flight=in_flight,
        runs=runs,
        ok=len(latencies),
        outcomes=dict(sorted(outcomes.items())),
        seconds=round(seconds, 3),
        throughput_per_s=round(steady_rate(ended, in_flight, last_start) or whole_loop, 2),
        loop_throughput_per_s=round(whole_loop, 2),
        p50_ms=ms(50),
        p95_ms=ms(95),
        p99_ms=ms(99),
    )


def steady_rate(ended: list[float], in_flight: int, last_start: float) -> float | None:
    """Runs ended per second while the loop was full: from the end of the first wave
    (the ``in_flight``-th end) to the start of the last run, after which fewer and fewer
    runs are in flight. Counting the drain as well would let the slowest of the last
    runs decide the figure: one straggler of 3 s at the end of a 6 s loop takes a third
    off it. None when that window holds too few ends to say (a quick run)."""
    ends = sorted(ended)
    if len(ends) <= in_flight:
        return None
    opened = ends[in_flight - 1]
    inside = [t for t in ends[in_flight:] if t <= last_start]
    if len(inside) < max(in_flight, 10) or last_start <= opened:
        return None
    return len(inside) / (last_start - opened)
