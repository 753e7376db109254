"""Keeping a child of the local stack running: report every exit, restart with backoff.

A worker killed by the OOM killer, a crash or ``kill -9`` used to leave ``make up``
running with no worker and not a word on the console: workflows just stopped moving.
:class:`Supervisor` waits on the process, says how it ended and where its log is, and
starts it again, waiting longer after each exit in a row (:class:`RestartBackoff`) so a
worker that cannot come up does not spin.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tollgate_dev.stack._process import ManagedProcess, StackError, logger


@dataclass(frozen=True)
class RestartBackoff:
    """How long to wait before restarting a process that exited.

    The first restart after an exit waits ``initial`` seconds, each further one in a row
    twice as long as the one before, at most ``maximum``. A run that stayed up
    ``reset_after`` seconds counts as healthy: after it, the wait starts at ``initial``.
    """

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("RestartBackoff needs 0 < initial <= maximum")
        if self.reset_after <= 0:
            raise ValueError("RestartBackoff needs reset_after > 0")


def describe_exit(returncode: int) -> str:
    """``returncode`` of a child for a human: its exit status, or the signal that killed it."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass(frozen=True)
class ProcessExit:
    """One unexpected exit of a supervised process, and what the supervisor did about it."""

    name: str
    pid: int | None
    returncode: int
    #: Seconds it had been up (ready) when it exited.
    uptime: float
    log_file: Path
    #: Seconds the supervisor waited before its first attempt to restart it.
    restart_in: float

    def __str__(self) -> str:
        return (
            f"{self.name} (pid {self.pid}) {describe_exit(self.returncode)} after "
            f"{self.uptime:.1f} s; its log: {self.log_file}"
        )


class Supervisor:
    """Restart ``process`` whenever it exits, until :meth:`stop`.

    Every exit is logged as a warning with its status and log file, and kept in
    :attr:`exits`; :attr:`restarts` counts the restarts that came up. ``on_restart`` is
    called after each one (the stack records the new pid there). A restart that fails to
    come up is logged and tried again after the next, longer, wait.
    """

    def __init__(
        self,
        process: ManagedProcess,
        *,
        backoff: RestartBackoff | None = None,
        on_restart: Callable[[ManagedProcess], None] | None = None,
    ) -> None:
        self.process = process
        self.backoff = backoff or RestartBackoff()
        self.on_restart = on_restart
        #: Restarts that came up since :meth:`start`.
        self.restarts = 0
        #: Every unexpected exit since :meth:`start`, oldest first.
        self.exits: list[ProcessExit] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the process is being watched."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start watching the (started) process."""
        if self.running:
            return
        if self.process.last_pid is None:
            raise StackError(f"cannot supervise {self.process.name}: it was never started")
        self._task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"supervise {self.process.name}"
        )

    async def stop(self) -> None:
        """Stop watching, so that stopping the process is not taken for a crash.

        A restart in progress is abandoned, and the process it was starting is killed.
        The process itself is left as it is, for its owner to stop.
        """
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})

    async def _watch(self) -> None:
        try:
            await self._supervise()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not pass silently either: the process is on its own now.
            logger.exception("supervising %s failed; it will not be restarted", self.process.name)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        name = self.process.name
        delay = self.backoff.initial
        while True:
            up_since = loop.time()
            returncode = await self.process.wait()
            uptime = loop.time() - up_since
            if uptime >= self.backoff.reset_after:
                delay = self.backoff.initial
            gone = ProcessExit(
                name, self.process.last_pid, returncode, uptime, self.process.log_file, delay
            )
            self.exits.append(gone)
            logger.warning("%s; restarting it in %.1f s", gone, delay)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff.maximum)
                try:
                    await self.process.start()
                except Exception as exc:
                    logger.warning(
                        "%s did not come back: %s; next attempt in %.1f s", name, exc, delay
                    )
                    continue
                break
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart(self.process)
            logger.warning(
                "%s restarted and ready (pid %s); restarts so far: %d",
                name,
                self.process.pid,
                self.restarts,
            )
