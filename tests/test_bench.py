"""The benchmark's quick mode against the test session's servers: every figure is there.

Timings are never asserted: on a shared 2-core machine they say nothing about the code.
What is checked is that one run produces every figure the issue's targets read, under
stable names, and writes its JSON and chart.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from rich.console import Console
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from tests.conftest import Harness
from tollgate import postgres
from tollgate.messages.service import MessageService
from tollgate.orders.service import OrderService
from tollgate_dev.bench import tracing
from tollgate_dev.bench.breakdown import _first_task_wait
from tollgate_dev.bench.loop import Pass, level_of, steady_rate
from tollgate_dev.bench.models import FULL, QUICK, BenchPlan, BenchReport
from tollgate_dev.bench.procs import listener_pid
from tollgate_dev.bench.report import RATIOS, print_report, write_results
from tollgate_dev.bench.run import BenchTarget, run_bench
from tollgate_dev.devices import poll_interval

pytestmark = pytest.mark.e2e

SCENARIOS = {"orders", "messages", "baseline_8", "baseline_3", "baseline_7"}
LEVEL_FIGURES = {
    "in_flight",
    "runs",
    "passes",
    "ok",
    "outcomes",
    "seconds",
    "throughput_per_s",
    "loop_throughput_per_s",
    "first_task_wait_p50_ms",
    "first_task_wait_p95_ms",
}
LEVEL_FIGURES |= {"p50_ms", "p95_ms", "p99_ms"}


def _nulls(value: object, path: str = "") -> list[str]:
    """Paths of every null in a JSON document."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for n, v in enumerate(value) for p in _nulls(v, f"{path}[{n}]")]
    return []


@pytest.mark.timeout(60)
async def test_quick_bench_reports_every_figure(
    h: Harness, temporal_address: str, database_url: str, owner_url: str, tmp_path: Path
) -> None:
    # Its own pool: at 40 in flight every start holds a connection until Temporal answers.
    pool = await postgres.create_pool(database_url, max_size=max(QUICK.levels) + 5)
    try:
        target = BenchTarget(
            orders=OrderService(h.client, pool, h.task_queue, inventory=h.inventory),
            messages=MessageService(h.client, pool, h.task_queue),
            temporal_address=temporal_address,
            namespace=h.settings.temporal_namespace,
            database_url=database_url,
            owner_url=owner_url,
            worker_pid=os.getpid(),  # the harness's worker runs in this process
            server_pid=listener_pid(urlsplit(f"//{temporal_address}").port or 0),
            reused_stack=True,
            workers_in_bench_process=True,
        )
        report = await run_bench(target, QUICK)
    finally:
        await pool.close()

    data_path, chart_path = write_results(report, tmp_path / "bench")
    data = json.loads((tmp_path / "bench" / "latest.json").read_text())
    assert data == json.loads(data_path.read_text())
    assert BenchReport.model_validate(data) == report
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench" / "latest.png").stat().st_size == chart_path.stat().st_size

    assert _nulls(data) == []
    assert data["format"] == "tollgate-bench/4"
    assert set(data["scenarios"]) == SCENARIOS
    for name, scenario in data["scenarios"].items():
        assert set(scenario["levels"]) == {"1", "5", "10", "20", "40"}, name
        for level in scenario["levels"].values():
            assert set(level) == LEVEL_FIGURES
            assert level["passes"] == len(QUICK.passes_at(level["in_flight"])) == 2
            # every run ended as its scenario expects: figures of failures would mislead
            assert level["ok"] == level["runs"], (name, level["outcomes"])
        assert set(scenario["cpu"]) == {
            "runs",
            "worker_seconds",
            "server_seconds",
            "machine_seconds",
            "worker_seconds_per_run",
            "server_seconds_per_run",
            "machine_seconds_per_run",
        }
        # the machine's CPU holds each process's (the kernel counts the machine's by
        # ticks and a process's more finely, so the sum is not compared)
        cpu = scenario["cpu"]
        assert cpu["machine_seconds"] > max(cpu["worker_seconds"], cpu["server_seconds"]) > 0
        assert cpu["machine_seconds_per_run"] > 0, name
        assert scenario["breakdown"]["samples"] == QUICK.one_at_a_time, name
        assert scenario["breakdown"]["total_ms"] > 0, name
    steps = {k: (v["activities"], v["local_activities"]) for k, v in data["scenarios"].items()}
    assert [steps[k] for k in sorted(SCENARIOS)] == [(3, 0), (7, 0), (8, 0), (1, 2), (3, 0)]
    assert set(data["gate"]) >= {
        "guarded_transitions_per_s",
        "plain_transitions_per_s",
        "overhead_pct",
        "guarded_server_us",
        "plain_server_us",
    }
    assert len(data["gate"]["round_overheads_pct"]) == data["gate"]["rounds"] == QUICK.gate_rounds
    assert set(data["ratios"]) == set(RATIOS)
    assert data["server"]["server_pid_found"] and data["server"]["in_memory"]
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu_model"]

    shown = io.StringIO()
    print_report(report, Console(file=shown, width=200))
    for name in RATIOS:
        assert f"({name})" in shown.getvalue()


@pytest.mark.timeout(150)
async def test_tracing_bench_counts_an_orders_spans_and_times_both_modes(
    h: Harness, owner_url: str, tmp_path: Path
) -> None:
    """``make bench-tracing`` in miniature: both workers serve, batches alternate which
    mode goes first, and every exported order is one trace of the same shape."""
    report = await tracing.measure(
        h.settings, owner_url=owner_url, work_dir=tmp_path, rounds=2, per_batch=2, warmup=0
    )
    assert report.not_completed == 0
    assert [r.first for r in report.per_round] == ["on", "off"]
    assert report.p50_on_ms > 0 and report.p50_off_ms > 0 and report.ratio > 0
    assert report.worker_cpu_ms_on > 0 and report.worker_cpu_ms_off > 0
    # The command's span, the workflow, two spans per activity (three), its SQL and HTTP
    # calls (the door's catalog call only for a SKU it does not remember: not these).
    # One SQL span more when validation's insert waited on the service's uncommitted one
    # and read the row again (gate.insert_or_match).
    assert {report.spans_min, report.spans_max} <= {24, 25}
    assert report.spans_by_kind["temporal"] == 2 + 2 * 3
    assert report.spans_by_kind["sql"] in (9, 10) and report.spans_by_kind["http client"] == 3
    text = io.StringIO()
    tracing.print_report(report, Console(file=text, width=120))
    assert "Spans per order: median" in text.getvalue()


def test_throughput_is_read_while_the_loop_is_full_not_during_its_drain() -> None:
    """20 in flight, a run ending every 0.1 s from t=1 s, the last run started at 10 s:
    10/s, whether the last runs end promptly or one straggles for seconds."""
    prompt = [1.0 + 0.1 * n for n in range(100)]
    straggling = [*prompt[:-1], 14.0]
    assert steady_rate(prompt, 20, last_start=10.0) == pytest.approx(10.0, rel=0.05)
    assert steady_rate(straggling, 20, last_start=10.0) == pytest.approx(10.0, rel=0.05)
    # Too short a loop to have a full stretch: the whole loop's figure is used instead.
    assert steady_rate(prompt[:25], 20, last_start=1.5) is None


def test_a_level_splits_its_runs_into_passes_more_of_them_one_at_a_time() -> None:
    assert FULL.passes_at(1) == [10] * 10
    assert FULL.passes_at(5) == [25, 25]
    assert FULL.passes_at(20) == [100, 100]
    assert BenchPlan(runs_per_slot=1, level_minimum=5).passes_at(5) == [3, 2]
    # never a pass with nothing to run
    assert QUICK.passes_at(1) == QUICK.passes_at(40) == [1, 1]


def test_a_levels_passes_are_read_together() -> None:
    """Latencies are pooled; throughput is the passes' steady runs over their steady
    time together, so a slow pass weighs by how long it lasted, not as half."""
    fast = Pass(in_flight=20, runs=100, seconds=6.0, latencies=[100.0] * 100)
    fast.outcomes["COMPLETED"] = 100
    fast.steady_runs, fast.steady_seconds = 80, 4.0  # 20/s
    slow = Pass(in_flight=20, runs=100, seconds=12.0, latencies=[300.0] * 99)
    slow.outcomes.update({"COMPLETED": 99, "error:RPCError": 1})
    slow.steady_runs, slow.steady_seconds = 80, 16.0  # 5/s
    level = level_of([fast, slow])
    assert (level.runs, level.passes, level.ok) == (200, 2, 199)
    assert level.outcomes == {"COMPLETED": 199, "error:RPCError": 1}
    assert level.throughput_per_s == pytest.approx(8.0)  # 160 runs in 20 s, not (20+5)/2
    assert level.loop_throughput_per_s == pytest.approx(199 / 18.0, abs=0.01)
    assert (level.p50_ms, level.p99_ms) == (100.0, 300.0)  # 100 fast and 99 slow ones
    # passes too short to have a steady stretch: the whole loops' rate stands in
    short = Pass(in_flight=5, runs=2, seconds=0.5, latencies=[50.0, 60.0])
    assert level_of([short, short]).throughput_per_s == pytest.approx(4.0)


def test_the_device_player_polls_less_often_the_more_messages_it_watches() -> None:
    """One at a time it looks every 5 ms; at 20 in flight every 20 ms, where a message
    takes over a second; never slower than every 25 ms."""
    assert poll_interval(1) == poll_interval(5) == pytest.approx(0.005)
    assert poll_interval(20) == pytest.approx(0.020)
    assert poll_interval(40) == poll_interval(10_000) == pytest.approx(0.025)


def test_a_first_task_wait_is_read_from_its_scheduled_and_started_events() -> None:
    """The wait is the first task's alone: a later, longer one does not count."""

    def event(kind: int, at_ms: int) -> HistoryEvent:
        stamped = HistoryEvent(event_type=kind)  # type: ignore[arg-type]
        stamped.event_time.FromMilliseconds(1_700_000_000_000 + at_ms)
        return stamped

    events = [
        event(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, 0),
        event(EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 0),
        event(EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED, 120),
        event(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 150),
        event(EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 200),
        event(EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED, 900),
    ]
    assert _first_task_wait(events) == pytest.approx(120.0)
    assert _first_task_wait(events[:2]) is None
