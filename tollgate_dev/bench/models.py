"""What a benchmark run reports, as ``latest.json`` holds it.

Every figure has a stable name (a field here, or a fixed key: scenario names,
in-flight levels as strings, ratio names), so a test or a script comparing runs can
find it. Times are milliseconds, rates are per second, CPU is seconds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

#: Bumped when a figure is renamed or its meaning changes.
REPORT_FORMAT: Final = "tollgate-bench/4"

#: Scenario keys. They run in the order ``run._scenarios`` lists them.
ORDERS = "orders"
MESSAGES = "messages"
BASELINE_ORDER = "baseline_8"
BASELINE_PROVIDERS = "baseline_3"
BASELINE_MESSAGE = "baseline_7"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class BenchPlan(_Frozen):
    """How much a run does; the defaults are the full run (``FULL``)."""

    mode: Literal["full", "quick"] = "full"
    #: In-flight levels of the closed loops; 1 is "one at a time".
    levels: tuple[int, ...] = (1, 5, 10, 20, 40)
    #: Runs at level 1 (where p99 is read).
    one_at_a_time: int = 100
    #: Runs at a higher level: ``in_flight * runs_per_slot``, within the bounds below.
    runs_per_slot: int = 10
    level_minimum: int = 40
    #: Caps the runs of a level (quick mode): fewer runs than the level means fewer in
    #: flight, so such figures only show that the level ran.
    level_maximum: int | None = None
    #: Passes a level's runs are split into, taken in turns with the other scenarios',
    #: forwards then backwards (A B C, C B A, ...): the machine's drift during a level
    #: then falls on every scenario alike instead of on whichever ran last. One at a
    #: time a pass costs nothing, so there are more of them.
    passes: int = 2
    passes_one_at_a_time: int = 10
    #: Unmeasured runs of each scenario before the first measured one.
    warm_up: int = 10
    #: The gate: concurrent writers, orders per table per round, rounds (alternating
    #: the guarded and the plain table, so drift hits both alike).
    gate_writers: int = 8
    gate_orders: int = 200
    gate_rounds: int = 7

    def runs_at(self, in_flight: int) -> int:
        """How many lifecycles the closed loop at ``in_flight`` runs."""
        if in_flight == 1:
            return self.one_at_a_time
        runs = max(self.level_minimum, in_flight * self.runs_per_slot)
        return runs if self.level_maximum is None else min(runs, self.level_maximum)

    def passes_at(self, in_flight: int) -> list[int]:
        """How many runs each pass of the level at ``in_flight`` makes (as even as they
        divide; never an empty pass)."""
        runs = self.runs_at(in_flight)
        passes = max(1, min(runs, self.passes_one_at_a_time if in_flight == 1 else self.passes))
        return [runs // passes + (1 if k < runs % passes else 0) for k in range(passes)]


FULL = BenchPlan()
#: The smoke test (``--quick``): every scenario at every level, with tiny counts.
QUICK = BenchPlan(
    mode="quick",
    one_at_a_time=2,
    runs_per_slot=1,
    level_minimum=1,
    level_maximum=2,
    warm_up=0,
    gate_writers=4,
    gate_orders=12,
    gate_rounds=2,
)


class Level(_Frozen):
    """One level: closed loops of ``in_flight`` lifecycles at all times, in ``passes``
    that together started ``runs``."""

    in_flight: int
    runs: int
    passes: int = 1
    #: How many ended as the scenario expects; only they count in rates and latencies.
    ok: int
    #: Final statuses (``error:<type>`` for a run that raised).
    outcomes: dict[str, int]
    seconds: float
    #: Runs ended as expected per second while ``in_flight`` were going (the loop's
    #: start and drain of each pass left out; see ``tollgate_dev.bench.loop``), or
    #: over the whole loops when they were too short to tell, as they always are one
    #: at a time (where nothing ramps up or drains anyway).
    throughput_per_s: float
    #: Over the whole loops of its passes, their drains included.
    loop_throughput_per_s: float = 0.0
    p50_ms: float
    p95_ms: float
    p99_ms: float
    #: How long the first workflow task of runs from the middle of each pass waited for
    #: a poller (history timestamps; None: not sampled).
    first_task_wait_p50_ms: float | None = None
    first_task_wait_p95_ms: float | None = None


class Cpu(_Frozen):
    """CPU time used by the worker serving a scenario, by the Temporal server and by the
    whole machine, summed over the scenario's measured phases, and per run that ended as
    expected."""

    runs: int
    worker_seconds: float
    server_seconds: float
    #: Every process's: the caller's side, Postgres and the provider sandbox included
    #: (:func:`tollgate_dev.bench.procs.machine_busy_seconds`). What a run costs when
    #: the cores are full, and so what throughput at saturation follows. Work a pass
    #: leaves behind (span exports, batched every few seconds) may land in the next
    #: scenario's pass; the turns' alternating order spreads that over all of them.
    machine_seconds: float
    worker_seconds_per_run: float
    server_seconds_per_run: float
    machine_seconds_per_run: float


class Breakdown(_Frozen):
    """Where the time of a run one at a time goes, read from workflow histories (the
    mean over ``samples`` runs): from the workflow's start to its end (for a message:
    to the completion of the activity that records DELIVERED)."""

    samples: int
    total_ms: float
    #: Inside activities: each one's started -> completed.
    in_activities_ms: float
    #: Activities waiting to be picked up: scheduled -> started.
    activity_queue_ms: float
    #: Workflow tasks, queued and run: scheduled -> completed.
    workflow_tasks_ms: float
    #: The rest: waiting for a signal (a message's confirmation), timers, server time
    #: between one task's end and the next one's start. Negative when tasks overlapped
    #: (a signal's workflow task runs while an activity does).
    other_ms: float


class Scenario(_Frozen):
    """One kind of lifecycle at every level."""

    title: str
    #: Regular activities one run executes.
    activities: int
    #: Local activities one run executes (the gate's reads and writes).
    local_activities: int = 0
    expected_status: str
    #: Keyed by in-flight level, as a string ("1", "5", ...).
    levels: dict[str, Level]
    cpu: Cpu
    breakdown: Breakdown


class Gate(_Frozen):
    """Version-checked transitions through ``tollgate.gate.transition``, with the
    trigger and audit (``orders``) and without (a plain copy of the table)."""

    writers: int
    orders: int
    #: Rounds, each moving its own orders through both tables back to back.
    rounds: int = 1
    transitions: int
    #: Each round's overhead, in percent, in the order they ran.
    round_overheads_pct: list[float] = []
    #: The median round's (by its overhead): its rates, and how much longer a guarded
    #: transition took than a plain one, in percent.
    guarded_transitions_per_s: float
    plain_transitions_per_s: float
    overhead_pct: float
    #: Server time of one single-row transition (one connection, no client, no commit).
    guarded_server_us: float
    plain_server_us: float


class Ratio(_Frozen):
    """One of the issue's targets: a figure, the bound it must meet, and whether it does."""

    description: str
    value: float | None
    target: str
    meets: bool


class Machine(_Frozen):
    cores: int
    cpu_model: str
    memory_gb: float
    platform: str
    python: str
    #: The 1-minute load average when the run started and ended: above the core count,
    #: something else competed for the CPU and every figure is pessimistic.
    load_at_start: float
    load_at_end: float


class Server(_Frozen):
    """The Temporal server measured, as its command line shows it (secrets left out)."""

    temporal_address: str
    #: None when its process could not be found (its flags are then unknown too).
    server_pid_found: bool
    in_memory: bool | None
    sqlite_pragmas: list[str]
    dynamic_config: list[str]
    #: A stack ``make up`` was running (True), or one the bench started (False).
    reused_stack: bool
    #: The workers run inside the bench's own process (the test): their CPU figures
    #: then include the load generator's.
    workers_in_bench_process: bool


class BenchReport(_Frozen):
    """Everything one run measured."""

    format: Literal["tollgate-bench/4"] = REPORT_FORMAT
    plan: BenchPlan
    started_at: datetime
    seconds: float
    machine: Machine
    server: Server
    #: Keyed by the names above (orders, messages, baseline_8, baseline_3, baseline_7).
    scenarios: dict[str, Scenario]
    gate: Gate
    #: Keyed by the names in :data:`tollgate_dev.bench.report.RATIOS`.
    ratios: dict[str, Ratio]
