"""Shared machinery for the local stack: ports, the child-process base classes, errors.

Every server of the local stack is a plain child process that logs to a file. The base
class here owns what they have in common: starting in a fresh session (so a Ctrl-C in
the terminal reaches only the parent, which then stops the children in order), stopping
with a polite signal and falling back to SIGKILL, killing on demand, polling until the
server serves, and quoting the end of the log when something fails to come up. This
project's own servers (the sandbox, the codec server) are ``python -m`` modules with a
health check: :class:`PythonServer` is what they share.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TypedDict, TypeVar

import httpx

logger = logging.getLogger("tollgate_dev.stack")

#: Every server of the local stack binds to the loopback interface only.
LOCALHOST = "127.0.0.1"

#: The repository root (where ``worker.py`` lives and ``tollgate`` is importable from).
PROJECT_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")

# prctl(2) option: signal to deliver to this process when its parent thread exits.
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A local-stack component could not be started, or its environment is unusable.

    The message is meant for a human at a terminal: it says what failed and, where a
    log exists, quotes its last lines.
    """


class NotReady(Exception):
    """What a readiness probe raises while its server does not serve yet: the message
    says why, and is quoted if the server never does (see ``ManagedProcess._poll``)."""


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` right now.

    ``SO_REUSEADDR`` is set, as Postgres, Go's ``net.Listen`` and uvicorn all do, so that
    connections in TIME_WAIT from a server that just stopped do not count as "busy"; a
    socket that is actually listening still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that nothing listens on at the moment of the call.

    The kernel picks it from the ephemeral range; there is an unavoidable window in which
    another process could take it, which is fine for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _python_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment plus ``extra``, with unbuffered Python output.

    A child's stdout is a file, so Python would block-buffer it: log lines (including the
    worker's readiness line) would only appear in 8 KiB chunks, or never if it is killed.
    """
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _temp_log(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"tollgate-{name}-")) / f"{name}.log"


def _parent_death_hook(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    Without it, a parent killed with SIGKILL (or a crashed test run) leaves Postgres and
    Temporal running, holding their ports until someone hunts them down. Linux only; on
    other systems ``LocalStack`` still reaps leftovers from its pid files on the next start.

    The hook runs in the forked child after ``subprocess`` has already switched user
    (``setreuid`` comes before ``preexec_fn``), which matters because changing credentials
    clears the parent-death signal. Caveat: the "parent" is the *thread* that forked, so
    the stack must be started from a thread that lives as long as it does (the event loop's).
    """
    if sys.platform != "linux":
        return None
    # Resolve prctl in the parent: the child should do as little as possible before exec.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()
    signum = int(sig)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signum)
        # The parent may have died between fork() and prctl(); then nobody would tell us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signum)

    return hook


def _read_log_tail(path: Path, start: int, lines: int) -> str:
    """The last ``lines`` lines of ``path`` written at or after byte offset ``start``."""
    try:
        with path.open("rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, end - 32_768))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


#: A log past this size when its process (re)starts is moved, whole, to ``<name>.1``
#: (replacing the one there) and begun afresh. A process's logs are then its current
#: file and one set aside, each this much at most plus one run's output: restarts no
#: longer pile up, though a single run that never restarts still grows its file.
LOG_ROTATE_BYTES = 64 * 1024 * 1024


def _open_log_for_child(path: Path, argv: Sequence[str]) -> tuple[int, int]:
    """Open ``path`` for appending, write a start banner, return ``(fd, offset)``.

    Appending (``O_APPEND``) keeps the history of every restart in one file, until it
    passes :data:`LOG_ROTATE_BYTES`; ``offset`` is where this run's output begins, so
    readiness checks and error messages only look at the current run.

    The log is created 0600 (and a directory made for it 0700): a log quotes requests,
    errors and connection details that are nobody else's business on a shared machine.
    A log an earlier run left readable to others is tightened here too.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileNotFoundError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.chmod(path, 0o600)  # an earlier run's may be readable to others
            os.replace(path, path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"\n=== {stamp} starting: {shlex.join(argv)}\n".encode())
        return fd, os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        os.close(fd)
        raise StackError(f"could not prepare the log file {path}: {exc}") from exc


class ManagedProcess:
    """One long-running child process with a log file.

    Subclasses implement :meth:`start` (spawn with :meth:`_spawn`, then wait until the
    server answers); this class provides :meth:`stop`, :meth:`restart`, :meth:`kill`,
    :attr:`pid` and :meth:`log_tail`.
    """

    #: Short name used in messages and pid files.
    name: str = "process"
    #: Signal that asks the process to shut down cleanly.
    stop_signal: signal.Signals = signal.SIGTERM
    #: Seconds to wait after ``stop_signal`` before resorting to SIGKILL.
    stop_timeout: float = 15.0

    def __init__(self, log_file: Path, *, start_timeout: float = 60.0) -> None:
        self.log_file = log_file.absolute()
        self.start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        # Set by kill(): the process is doomed even though it has not been reaped yet.
        self._killed = False

    @property
    def pid(self) -> int | None:
        """Pid of the running process, or ``None`` when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self.pid is not None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (negative: killed by that signal), if it ended."""
        return None if self._proc is None else self._proc.returncode

    @property
    def last_pid(self) -> int | None:
        """Pid of the last run, whether or not it is still running."""
        return None if self._proc is None else self._proc.pid

    async def wait(self) -> int:
        """Wait until the current run ends; its exit status (negative: killed by that
        signal). Returns at once when it has already ended."""
        if self._proc is None:
            raise StackError(f"{self.name} was never started")
        return await self._proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines this run wrote to its log."""
        return _read_log_tail(self.log_file, self._log_offset, lines)

    async def start(self) -> None:
        """Start the process and return once it serves requests."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Ask the process to exit, wait, and SIGKILL it if it does not in time.

        Does nothing when it is not running. The process group is killed on timeout so
        that helpers the process forked do not outlive it.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            logger.debug("stopping %s (pid %d) with %s", self.name, proc.pid, self.stop_signal.name)
            with suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                logger.warning(
                    "%s (pid %d) did not stop within %.0f s; killing it",
                    self.name,
                    proc.pid,
                    self.stop_timeout,
                )
                self.kill()
                await proc.wait()
        await proc.wait()

    async def restart(self) -> None:
        """:meth:`stop`, then :meth:`start` again with the same configuration."""
        await self.stop()
        await self.start()

    def kill(self) -> None:
        """SIGKILL the process and its whole process group, without waiting.

        Meant for crash tests: nothing gets a chance to clean up. The next :meth:`start`
        waits for the killed process to be reaped before spawning a new one.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        self._killed = True
        # The child leads its own session and process group (start_new_session=True),
        # so its pid is the group id; as root this also reaches a dropped-privilege child.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            with suppress(ProcessLookupError):
                proc.kill()

    async def _reap(self) -> None:
        """Wait for a previous run that was killed or is exiting to be fully gone."""
        if self._proc is not None:
            if self._proc.returncode is None and not self._killed:
                raise StackError(f"{self.name} is already running (pid {self._proc.pid})")
            await self._proc.wait()
        self._killed = False

    async def _spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        """Start ``argv`` as this object's process, output appended to the log file.

        ``user``/``group`` switch to that account in the child (used to run Postgres as
        an unprivileged user when we are root); supplementary groups are then dropped too.
        """
        await self._reap()
        shown = self._shown_argv(argv)
        fd, self._log_offset = _open_log_for_child(self.log_file, shown)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                # Own session: terminal signals (Ctrl-C) go to the parent only, which then
                # shuts the stack down in order; and kill() can take out the whole group.
                start_new_session=True,
                preexec_fn=_parent_death_hook(self.stop_signal),
                user=user,
                group=group,
                extra_groups=[] if user is not None else None,
                # What a child creates in the state directory (Temporal's SQLite file,
                # say) is nobody else's business either.
                umask=0o077,
            )
        except OSError as exc:
            raise StackError(f"could not run {argv[0]}: {exc}") from exc
        finally:
            os.close(fd)
        logger.debug("started %s (pid %d): %s", self.name, self._proc.pid, shlex.join(shown))

    def _shown_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as the log banner and debug output show it.

        A subclass whose command line carries a secret hides it here: logs are private
        files, but they get pasted into bug reports.
        """
        return list(argv)

    async def _started(self, ready: Awaitable[T]) -> T:
        """Await ``ready``, the check that the process just spawned serves; if it fails
        or is cancelled, kill the process rather than leave it half started."""
        try:
            return await ready
        except BaseException:
            await self._abort_start()
            raise

    async def _poll(
        self,
        probe: Callable[[], Awaitable[T]],
        *,
        deadline: float,
        interval: float,
        failing: str,
    ) -> T:
        """Call ``probe`` every ``interval`` seconds until it returns, while this process
        is alive; what it returns is returned.

        ``probe`` raises :class:`NotReady` while the server does not serve yet. Past
        ``deadline`` (event-loop time) the start fails with ``failing``, the time it was
        given, and the last reason the probe gave.
        """
        loop = asyncio.get_running_loop()
        last = "no answer"
        while True:
            self._check_alive()
            try:
                return await probe()
            except NotReady as exc:
                last = str(exc)
            if loop.time() > deadline:
                raise self._failure(f"{failing} within {self.start_timeout:.0f} s (last: {last})")
            await asyncio.sleep(interval)

    async def _wait_healthy(self, health_url: str) -> None:
        """Wait until ``health_url`` answers 200 while this process is still alive."""
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        async with httpx.AsyncClient(timeout=2.0) as http:

            async def healthy() -> None:
                try:
                    response = await http.get(health_url)
                except httpx.HTTPError as exc:
                    raise NotReady(repr(exc)) from exc
                if response.status_code != 200:
                    raise NotReady(f"HTTP {response.status_code}")
                # Still ours? Another server on the port would answer too while ours
                # dies of "address already in use".
                self._check_alive()

            await self._poll(
                healthy, deadline=deadline, interval=0.1, failing=f"{health_url} did not answer 200"
            )

    def _failure(self, what: str) -> StackError:
        """A :class:`StackError` saying ``what`` went wrong, quoting the log."""
        tail = self.log_tail()
        where = f"last lines of {self.log_file}:\n{tail}" if tail else f"log: {self.log_file}"
        return StackError(f"{self.name} {what}; {where}")

    def _check_alive(self) -> None:
        """Raise with the log tail if the process exited during startup."""
        proc = self._proc
        if proc is None:
            raise StackError(f"{self.name} was never started")
        if proc.returncode is not None:
            raise self._failure(f"exited with status {proc.returncode} while starting")

    async def _abort_start(self) -> None:
        """Kill a process whose startup failed, so that it does not linger."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self.kill()
            await proc.wait()


class ServerOptions(TypedDict, total=False):
    """What every :class:`PythonServer` takes besides its port: a subclass that adds
    options of its own passes these through as ``**options: Unpack[ServerOptions]``."""

    cwd: Path
    env: Mapping[str, str] | None
    log_file: Path | None
    start_timeout: float


class PythonServer(ManagedProcess):
    """One of this project's servers, ``python -m <module>`` on ``127.0.0.1:port``, run
    in ``cwd`` with ``env`` added to the environment. Ready once ``GET /health``
    answers 200.

    A subclass names its :attr:`module`; it may add options after ``--host`` and
    ``--port`` (:meth:`_options`) and shape the child's environment (:meth:`_environment`).
    """

    stop_timeout = 10.0
    #: What ``python -m`` runs.
    module: str
    #: The path that answers 200 once the server serves.
    health_path = "/health"

    def __init__(
        self,
        port: int,
        *,
        cwd: Path = PROJECT_ROOT,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.cwd = cwd
        self.env = dict(env or {})
        super().__init__(log_file or _temp_log(self.name), start_timeout=start_timeout)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{LOCALHOST}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        argv = [sys.executable, "-m", self.module, "--host", LOCALHOST, "--port", str(self.port)]
        return argv + self._options()

    def _options(self) -> list[str]:
        """Options of this server after ``--host`` and ``--port``."""
        return []

    def _environment(self) -> dict[str, str]:
        """The child's environment: ours plus ``env``, with unbuffered Python output."""
        return _python_env(self.env)

    async def start(self) -> None:
        """Start the server and wait for its health check."""
        await self._spawn(self.command(), env=self._environment(), cwd=self.cwd)
        await self._started(self._wait_healthy(f"{self.url}{self.health_path}"))
        logger.info("%s ready on %s (pid %s)", self.name, self.url, self.pid)
