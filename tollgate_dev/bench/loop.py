"""The closed loop: keep N lifecycles in flight, start the next as soon as one ends.

A closed loop measures what the system sustains at a given concurrency: throughput is
runs that ended as expected per second of the loop, latency is each run's own time from
its start call to its end. Unlike an open loop at a fixed rate it never queues work the
system cannot take, so latency at 40 in flight is the system's, not a backlog's.
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

    async def lane() -> None:
        while (n := next(numbers)) < runs:
            started = time.perf_counter()
            try:
                status = await run(n)
            except Exception as exc:  # counted and shown: one failure must not end a run
                outcomes[f"error:{type(exc).__name__}"] += 1
                continue
            outcomes[status] += 1
            if status == expected:
                latencies.append((time.perf_counter() - started) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(in_flight, runs))))
    seconds = time.perf_counter() - began

    def ms(p: float) -> float:
        value = percentile(latencies, p)
        return round(value, 1) if value is not None else 0.0

    return Level(
        in_flight=in_flight,
        runs=runs,
        ok=len(latencies),
        outcomes=dict(sorted(outcomes.items())),
        seconds=round(seconds, 3),
        throughput_per_s=round(len(latencies) / seconds, 2) if seconds > 0 else 0.0,
        p50_ms=ms(50),
        p95_ms=ms(95),
        p99_ms=ms(99),
    )
