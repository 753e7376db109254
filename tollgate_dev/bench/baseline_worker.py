"""The worker that serves the baseline workflows, in this process or as its own.

``make bench`` runs it as a process of its own, as Tollgate's worker is, so that
neither worker shares a Python interpreter (and its one GIL) with the load the bench
generates. The test of the bench runs it in-process, as the test's Tollgate worker is.

``python -m tollgate_dev.bench.baseline_worker --address HOST:PORT --task-queue Q``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from tollgate_dev.bench.baseline import BaselineWorkflow, noop
from tollgate_dev.stack._process import PROJECT_ROOT
from tollgate_dev.stack.services import WorkerProcess

#: Printed once the worker polls; what :class:`BaselineWorkerProcess` waits for.
READY_LINE = "baseline worker ready"
#: Slot limits as Tollgate's worker has them by default (``tollgate.settings``), so the
#: two workers differ in what they run, not in how much they may run at once.
_SLOTS = 100


def baseline_worker(client: Client, task_queue: str) -> Worker:
    """A worker for the baseline workflows on ``task_queue``; use it as ``async with``."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[BaselineWorkflow],
        activities=[noop],
        max_concurrent_activities=_SLOTS,
        max_concurrent_workflow_tasks=_SLOTS,
    )


class BaselineWorkerProcess(WorkerProcess):
    """The baseline worker as a child process, ready once it printed :data:`READY_LINE`."""

    name = "bench-worker"

    def __init__(self, address: str, namespace: str, task_queue: str, log_file: Path) -> None:
        super().__init__({}, PROJECT_ROOT, log_file=log_file, ready_line=READY_LINE)
        self._args = ["--address", address, "--namespace", namespace, "--task-queue", task_queue]

    def command(self) -> list[str]:
        """``python -m tollgate_dev.bench.baseline_worker`` with this worker's options."""
        return [sys.executable, "-m", "tollgate_dev.bench.baseline_worker", *self._args]


async def _serve(address: str, namespace: str, task_queue: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = await Client.connect(address, namespace=namespace)
    async with baseline_worker(client, task_queue):
        print(READY_LINE, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the baseline workflows until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tollgate_dev.bench.baseline_worker")
    parser.add_argument("--address", required=True, help="Temporal gRPC host:port")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.address, args.namespace, args.task_queue))


if __name__ == "__main__":
    main()
