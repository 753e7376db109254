"""The issue's targets as ratios, and the run as a table, a JSON file and a chart."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tollgate_dev.bench.models import (
    BASELINE_MESSAGE,
    BASELINE_ORDER,
    MESSAGES,
    ORDERS,
    BenchReport,
    Gate,
    Ratio,
    Scenario,
)

#: The level the throughput targets are read at.
TARGET_LEVEL = "20"


@dataclass(frozen=True)
class _Target:
    description: str
    bound: float
    at_most: bool

    @property
    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:g}"

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return value <= self.bound if self.at_most else value >= self.bound


#: The issue's targets, by the stable name of their ratio in the report.
RATIOS: dict[str, _Target] = {
    "order_p50_vs_baseline": _Target(
        "order p50 one at a time / 8-activity baseline p50", 0.75, at_most=True
    ),
    "order_throughput_vs_baseline": _Target(
        f"order throughput at {TARGET_LEVEL} in flight / 8-activity baseline's", 1.2, at_most=False
    ),
    "message_p50_vs_baseline": _Target(
        "message p50 (send to DELIVERED) one at a time / 7-activity baseline p50",
        0.75,
        at_most=True,
    ),
    "message_throughput_vs_baseline": _Target(
        f"message throughput at {TARGET_LEVEL} in flight / 7-activity baseline's",
        1.2,
        at_most=False,
    ),
    "gate_transitions_per_s": _Target(
        "gate: version-checked transitions per second (trigger + audit)", 4000, at_most=False
    ),
    "gate_overhead_pct": _Target(
        "gate: trigger + audit overhead over a plain UPDATE, %", 15, at_most=True
    ),
}


def _quotient(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _figure(scenario: Scenario, level: str, name: str) -> float | None:
    found = scenario.levels.get(level)
    return None if found is None else float(getattr(found, name))


def ratios(scenarios: dict[str, Scenario], gate: Gate) -> dict[str, Ratio]:
    """Every target's ratio, computed from the run's figures."""
    values: dict[str, float | None] = {}
    for key, lifecycle, baseline in (
        ("order", scenarios[ORDERS], scenarios[BASELINE_ORDER]),
        ("message", scenarios[MESSAGES], scenarios[BASELINE_MESSAGE]),
    ):
        values[f"{key}_p50_vs_baseline"] = _quotient(
            _figure(lifecycle, "1", "p50_ms"), _figure(baseline, "1", "p50_ms")
        )
        values[f"{key}_throughput_vs_baseline"] = _quotient(
            _figure(lifecycle, TARGET_LEVEL, "throughput_per_s"),
            _figure(baseline, TARGET_LEVEL, "throughput_per_s"),
        )
    values["gate_transitions_per_s"] = gate.guarded_transitions_per_s
    values["gate_overhead_pct"] = gate.overhead_pct
    return {
        name: Ratio(
            description=target.description,
            value=values[name],
            target=target.text,
            meets=target.met(values[name]),
        )
        for name, target in RATIOS.items()
    }


# --------------------------------------------------------------------------- table

#: Which baseline a lifecycle's rows are compared with in the table.
_BASELINE_OF = {ORDERS: BASELINE_ORDER, MESSAGES: BASELINE_MESSAGE}


def print_report(report: BenchReport, console: Console) -> None:
    """The closed loops, CPU, the gate and the targets, as tables."""
    m, s = report.machine, report.server
    store = "in memory" if s.in_memory else "SQLite file" if s.in_memory is False else "unknown"
    if s.sqlite_pragmas:
        store += f" ({', '.join(s.sqlite_pragmas)})"
    console.print(
        f"Tollgate bench ({report.plan.mode}), {report.started_at:%Y-%m-%d %H:%M %Z}, "
        f"{report.seconds:.0f} s\n{m.cores} cores, {m.cpu_model}, {m.memory_gb:g} GB, "
        f"{m.platform}, Python {m.python}; load average (1 min) {m.load_at_start:.1f} at the "
        f"start, {m.load_at_end:.1f} at the end (other work on the machine skews figures)"
        f"\nTemporal dev server at {s.temporal_address}, "
        f"store {store}, dynamic config: {', '.join(s.dynamic_config) or 'none'}"
        f"{'' if s.server_pid_found else ' (its process was not found: no server CPU)'}"
    )
    passes = ", ".join(
        f"{len(report.plan.passes_at(lv))} at {lv} in flight" for lv in report.plan.levels
    )
    loops = Table(
        title="closed loops (latency: start call to the expected end); each level in passes "
        f"taken in turns, forwards then backwards (passes: {passes})"
    )
    for column in ("scenario", "in flight", "ok/runs", "per s", "p50 ms", "p95 ms", "p99 ms"):
        loops.add_column(column, justify="left" if column == "scenario" else "right")
    loops.add_column("p50 / baseline", justify="right")
    loops.add_column("per s / baseline", justify="right")
    loops.add_column("first task wait p50/p95 ms", justify="right")
    for key, scenario in report.scenarios.items():
        baseline = report.scenarios.get(_BASELINE_OF.get(key, ""))
        for level_key, level in scenario.levels.items():
            p50_ratio = thr_ratio = ""
            if baseline is not None and level_key in baseline.levels:
                base = baseline.levels[level_key]
                p50_ratio = _x(_quotient(level.p50_ms, base.p50_ms))
                thr_ratio = _x(_quotient(level.throughput_per_s, base.throughput_per_s))
            loops.add_row(
                scenario.title if level_key == next(iter(scenario.levels)) else "",
                level_key,
                f"{level.ok}/{level.runs}",
                f"{level.throughput_per_s:.1f}",
                f"{level.p50_ms:.0f}",
                f"{level.p95_ms:.0f}",
                f"{level.p99_ms:.0f}",
                p50_ratio,
                thr_ratio,
                _waits(level.first_task_wait_p50_ms, level.first_task_wait_p95_ms),
                end_section=level_key == list(scenario.levels)[-1],
            )
    console.print(loops)
    cpu = Table(
        title="CPU per run, over the measured phases (worker, Temporal server, whole machine)"
    )
    for column in ("scenario", "runs", "worker ms/run", "server ms/run", "machine ms/run"):
        cpu.add_column(column, justify="left" if column == "scenario" else "right")
    for scenario in report.scenarios.values():
        c = scenario.cpu
        cpu.add_row(
            scenario.title,
            str(c.runs),
            f"{c.worker_seconds_per_run * 1000:.1f}",
            f"{c.server_seconds_per_run * 1000:.1f}",
            f"{c.machine_seconds_per_run * 1000:.1f}",
        )
    console.print(cpu)
    samples = max(scenario.breakdown.samples for scenario in report.scenarios.values())
    where = Table(
        title=f"where the time goes, one at a time (workflow histories, mean of the last {samples})"
    )
    for column in ("scenario", "activities", "total ms", "in activities", "activity queue"):
        where.add_column(column, justify="left" if column == "scenario" else "right")
    where.add_column("workflow tasks (and local activities)", justify="right")
    where.add_column("other (signal wait; < 0: overlap)", justify="right")
    for scenario in report.scenarios.values():
        b = scenario.breakdown
        steps = str(scenario.activities)
        if scenario.local_activities:
            steps += f" + {scenario.local_activities} local"
        where.add_row(
            scenario.title,
            steps,
            f"{b.total_ms:.0f}",
            f"{b.in_activities_ms:.0f}",
            f"{b.activity_queue_ms:.0f}",
            f"{b.workflow_tasks_ms:.0f}",
            f"{b.other_ms:.0f}",
        )
    console.print(where)
    if s.workers_in_bench_process:
        console.print("(the workers ran inside the bench process: worker CPU includes the load)")
    g = report.gate
    console.print(
        f"gate: {g.transitions} transitions each way, {g.writers} writers: "
        f"{g.guarded_transitions_per_s:,.0f}/s with trigger + audit, "
        f"{g.plain_transitions_per_s:,.0f}/s plain (the median of {g.rounds} rounds); "
        f"overhead {g.overhead_pct:.1f}% ({_spread(g.round_overheads_pct)}); "
        f"server time per transition {g.guarded_server_us:.0f} us guarded, "
        f"{g.plain_server_us:.0f} us plain"
    )
    targets = Table(title="targets")
    for column in ("ratio", "value", "target", "met"):
        targets.add_column(column, justify="left" if column == "ratio" else "right")
    for name, ratio in report.ratios.items():
        value = "-" if ratio.value is None else _number(ratio.value)
        met = "[green]yes[/green]" if ratio.meets else "[red]no[/red]"
        targets.add_row(f"{ratio.description} ({name})", value, ratio.target, met)
    console.print(targets)


def _number(value: float) -> str:
    """``4,012`` for rates, ``35.5`` or ``1.244`` for percentages and ratios."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


# --------------------------------------------------------------------------- files


def draw_chart(report: BenchReport, path: Path) -> None:
    """p50 latency against throughput per scenario, p95 as the upper error bar, each
    point labelled with its in-flight level."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 6.5), dpi=110)
    for scenario in report.scenarios.values():
        levels = list(scenario.levels.items())
        xs = [level.throughput_per_s for _, level in levels]
        ys = [level.p50_ms for _, level in levels]
        above = [level.p95_ms - level.p50_ms for _, level in levels]
        axes.errorbar(
            xs,
            ys,
            yerr=[[0.0] * len(ys), above],
            marker="o",
            capsize=3,
            label=scenario.title,
            linestyle="--" if scenario.title.startswith("baseline") else "-",
        )
        for (key, _), x, y in zip(levels, xs, ys, strict=True):
            axes.annotate(key, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    m = report.machine
    axes.set_title(
        f"Tollgate bench {report.started_at:%Y-%m-%d %H:%M}: {m.cores} cores, {m.cpu_model}"
        "\nlatency p50 (bar up to p95) against throughput; labels: lifecycles in flight",
        fontsize=10,
    )
    axes.set_xlabel("throughput (completed per second)")
    # Latencies span two orders of magnitude from 1 to 40 in flight: a log axis keeps
    # the runs one at a time readable next to the saturated ones.
    axes.set_yscale("log")
    axes.set_ylabel("latency (ms, log scale)")
    axes.set_xlim(left=0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_results(report: BenchReport, directory: Path) -> tuple[Path, Path]:
    """``bench-<time>.json`` and ``.png`` in ``directory``, copied to ``latest.*``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = f"bench-{report.started_at:%Y%m%d-%H%M%S}"
    data, chart = directory / f"{stem}.json", directory / f"{stem}.png"
    data.write_text(report.model_dump_json(indent=2) + "\n")
    draw_chart(report, chart)
    shutil.copyfile(data, directory / "latest.json")
    shutil.copyfile(chart, directory / "latest.png")
    return data, chart


def _spread(values: list[float]) -> str:
    """``from a to b`` over the rounds' figures (one round: ``one round``)."""
    if len(values) < 2:
        return "one round"
    return f"rounds from {min(values):.0f}% to {max(values):.0f}%"


def _waits(p50: float | None, p95: float | None) -> str:
    """``p50/p95`` in whole ms, or empty when the level was not sampled."""
    if p50 is None or p95 is None:
        return ""
    return f"{p50:.0f}/{p95:.0f}"
