"""``python -m tollgate_dev.bench [--quick] [--json]`` (``make bench``).

Uses the stack ``make up`` runs when it answers, else brings the local stack up from
the settings (state in ``STATE_DIR``, as ``make demo`` does) and stops it afterwards.
Progress goes to stderr; the tables (or, with ``--json``, the report) to stdout. The
exit status is 1 when a lifecycle did not end as its scenario expects: the figures of
such a run measure something else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from tollgate import postgres
from tollgate.messages.service import MessageService
from tollgate.orders.service import OrderService
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import DEFAULT_TEMPORAL_PORT, Settings
from tollgate.temporal import connect
from tollgate_dev.bench.models import FULL, QUICK, BenchPlan, BenchReport
from tollgate_dev.bench.procs import listener_pid, recorded_pid
from tollgate_dev.bench.report import print_report, write_results
from tollgate_dev.bench.run import BenchTarget, run_bench
from tollgate_dev.stack import LocalStack, StackError, running_owner_url, stack_is_up


async def _bench(
    settings: Settings,
    plan: BenchPlan,
    *,
    owner_url: str,
    worker_pid: int | None,
    server_pid: int | None,
    reused: bool,
    log_dir: Path,
    say: Console,
) -> BenchReport:
    client = await connect(settings)
    # Room for every lifecycle in flight: a start holds a connection until Temporal
    # answers (the row insert and the start share a transaction).
    pool = await postgres.create_pool(settings.database_url, max_size=max(plan.levels) + 5)
    try:
        async with build_http_client(settings) as http:
            target = BenchTarget(
                orders=OrderService(client, pool, settings.task_queue, inventory=Inventory(http)),
                messages=MessageService(client, pool, settings.task_queue),
                temporal_address=settings.temporal_address,
                namespace=settings.temporal_namespace,
                database_url=settings.database_url,
                owner_url=owner_url,
                worker_pid=worker_pid,
                server_pid=server_pid,
                reused_stack=reused,
                workers_in_bench_process=False,
            )
            return await run_bench(
                target,
                plan,
                baseline_worker_log=log_dir / "bench-worker.log",
                progress=lambda line: say.print(line, markup=False, highlight=False),
            )
    finally:
        await pool.close()


async def _main(plan: BenchPlan, say: Console, *, in_memory: bool) -> tuple[BenchReport, Path]:
    settings = Settings()
    if await stack_is_up(settings):
        say.print(f"Using the running stack (Temporal at {settings.temporal_address}).")
        if in_memory:
            say.print("--temporal-in-memory is ignored: the running stack's server is used.")
        port = urlsplit(f"//{settings.temporal_address}").port or DEFAULT_TEMPORAL_PORT
        report = await _bench(
            settings,
            plan,
            owner_url=running_owner_url(settings),
            worker_pid=recorded_pid(settings.state_dir, "worker"),
            server_pid=recorded_pid(settings.state_dir, "temporal") or listener_pid(port),
            reused=True,
            log_dir=settings.state_dir / "logs",
            say=say,
        )
        return report, settings.state_dir / "bench"
    say.print(f"Starting the local stack in {settings.state_dir}/ ...")
    async with LocalStack.from_settings(settings, temporal_db_file=not in_memory) as stack:
        stack_settings = stack.client_settings()
        assert stack.worker is not None
        report = await _bench(
            stack_settings,
            plan,
            owner_url=stack.database_owner_url,
            worker_pid=stack.worker.pid,
            server_pid=stack.temporal.pid,
            reused=False,
            log_dir=stack.log_dir,
            say=say,
        )
    return report, stack.state_dir / "bench"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, print it, write its JSON and chart."""
    parser = argparse.ArgumentParser(
        prog="python -m tollgate_dev.bench",
        description="Tollgate's lifecycles against bare Temporal baselines, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--temporal-in-memory",
        action="store_true",
        help="when starting the stack, keep Temporal in memory instead of its SQLite file "
        "(to see what the file costs; make up and make demo use the file)",
    )
    args = parser.parse_args(argv)
    say = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 150)
    # Piped output gets a fixed width so the tables are not squeezed to 80 columns.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    try:
        plan = QUICK if args.quick else FULL
        report, directory = asyncio.run(_main(plan, say, in_memory=args.temporal_in_memory))
    except StackError as exc:
        say.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    data, chart = write_results(report, directory)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_report(report, out)
    say.print(f"wrote {data} and {chart} (and latest.json, latest.png beside them)")
    failed = [
        f"{key} at {level_key}: {level.outcomes}"
        for key, scenario in report.scenarios.items()
        for level_key, level in scenario.levels.items()
        if level.ok < level.runs
    ]
    if failed:
        say.print("[red]Some lifecycles did not end as expected:[/red] " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
