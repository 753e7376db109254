"""The local stack against real processes: Postgres, the Temporal dev server, the sandbox.

Each test starts its own servers on free ports in a tmp dir, so they run alongside the
session-wide servers of ``conftest.py`` and alongside a ``make up`` on the default ports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

import tollgate_dev.stack._process as stack_process
import tollgate_dev.stack.temporal as stack_temporal
from tests.waiting import eventually
from tollgate.migrate import SCHEMA_DIR
from tollgate.names import SEARCH_ATTRIBUTES
from tollgate.settings import Settings
from tollgate_dev.stack import (
    LocalPostgres,
    LocalStack,
    ManagedProcess,
    RestartBackoff,
    SandboxProcess,
    StackError,
    Supervisor,
    TemporalDevServer,
    WorkerProcess,
    free_port,
    port_is_free,
)

LOCALHOST = "127.0.0.1"


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port something else is listening on for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


@asynccontextmanager
async def _open(connecting: Awaitable[asyncpg.Connection]) -> AsyncIterator[asyncpg.Connection]:
    """The connection ``connecting`` makes, closed when the block ends however it ends."""
    conn = await connecting
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _running(process: ManagedProcess) -> AsyncIterator[None]:
    """``process`` started for the block and stopped after it, also when a check fails:
    a server left running would hold its port and directory for the rest of the run."""
    await process.start()
    try:
        yield
    finally:
        await process.stop()


def test_free_port_is_free_until_taken(listening_port: int) -> None:
    port = free_port()
    assert port_is_free(LOCALHOST, port)
    assert not port_is_free(LOCALHOST, listening_port)


async def test_postgres_lifecycle(tmp_path: Path) -> None:
    server = LocalPostgres(tmp_path / "pg" / "data", free_port(), durable=False)
    async with _running(server):
        assert server.url == f"postgresql://tollgate@127.0.0.1:{server.port}/tollgate"
        password = quote(server.owner_password, safe="")
        assert server.owner_url == (
            f"postgresql://tollgate_owner:{password}@127.0.0.1:{server.port}/tollgate"
        )
        assert await _roles(server) == {
            "tollgate": {"login": True, "super": False, "groups": ["tollgate_app"]},
            "tollgate_app": {"login": False, "super": False, "groups": []},
            "tollgate_owner": {"login": True, "super": False, "groups": []},
            "database owner": "tollgate_owner",
        }
        async with _open(asyncpg.connect(server.url)) as conn:
            assert await conn.fetchval("SELECT current_user") == "tollgate"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CREATE TABLE survivors (name text)")
        async with _open(asyncpg.connect(server.owner_url)) as conn:
            await conn.execute("CREATE TABLE survivors (name text)")
            await conn.execute("INSERT INTO survivors VALUES ('restart')")

        await server.restart()
        assert await _survivors(server) == ["restart"]

        # A crash: SIGKILL leaves postmaster.pid behind, which must not block the restart.
        server.kill()
        await server.start()
        assert (server.data_dir / "postmaster.pid").exists()
        assert await _survivors(server) == ["restart"]

        # A second server on the same cluster is refused with a clear message.
        twin = LocalPostgres(server.data_dir, free_port(), durable=False)
        with pytest.raises(StackError, match="already running"):
            await twin.start()
    assert not server.running
    assert server.returncode == 0
    assert not (server.data_dir / "postmaster.pid").exists()


async def test_postgres_start_failure_quotes_the_log(tmp_path: Path, listening_port: int) -> None:
    server = LocalPostgres(tmp_path / "data", listening_port, durable=False, start_timeout=20)
    with pytest.raises(StackError, match="Address already in use") as caught:
        await server.start()
    assert str(server.log_file) in str(caught.value)
    assert not server.running


async def _survivors(server: LocalPostgres) -> list[str]:
    async with _open(asyncpg.connect(server.owner_url)) as conn:
        return [row["name"] for row in await conn.fetch("SELECT name FROM survivors")]


async def _roles(server: LocalPostgres) -> dict[str, object]:
    """The Tollgate roles' attributes and memberships, and who owns the database."""
    async with _open(server.connect_admin()) as conn:
        rows = await conn.fetch(
            """
            SELECT r.rolname, r.rolcanlogin, r.rolsuper OR r.rolcreaterole OR r.rolcreatedb
                   OR r.rolbypassrls OR r.rolreplication AS super,
                   coalesce(array_agg(g.rolname ORDER BY g.rolname)
                            FILTER (WHERE g.rolname IS NOT NULL), '{}') AS groups
              FROM pg_roles r
              LEFT JOIN pg_auth_members m ON m.member = r.oid
              LEFT JOIN pg_roles g ON g.oid = m.roleid
             WHERE r.rolname LIKE 'tollgate%'
             GROUP BY r.rolname, r.rolcanlogin, super
            """
        )
        roles: dict[str, object] = {
            r["rolname"]: {"login": r["rolcanlogin"], "super": r["super"], "groups": r["groups"]}
            for r in rows
        }
        roles["database owner"] = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'tollgate'"
        )
        return roles


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[LocalPostgres]:
    """A cluster of the test's own, started; stopped after the test however it ends."""
    server = LocalPostgres(tmp_path / "data", free_port(), durable=False)
    async with _running(server):
        yield server


async def _as_superuser(server: LocalPostgres, *statements: str) -> None:
    """Run ``statements`` one by one as the cluster's superuser (over the unix socket):
    how these tests make a cluster look like one an older Tollgate left."""
    async with _open(server.connect_admin()) as admin:
        for statement in statements:
            await admin.execute(statement)


async def test_postgres_upgrades_a_cluster_where_the_app_role_was_superuser(
    postgres: LocalPostgres,
) -> None:
    """Before the roles were split, ``tollgate`` was a superuser owning the database and
    every table. A start takes all of that away and hands it to ``tollgate_owner``."""
    await _as_superuser(
        postgres,
        "ALTER ROLE tollgate SUPERUSER CREATEDB",
        "REVOKE tollgate_app FROM tollgate",
        "ALTER DATABASE tollgate OWNER TO tollgate",
        "DROP ROLE tollgate_owner",
    )
    async with _open(asyncpg.connect(postgres.url)) as conn:
        await conn.execute("CREATE TABLE legacy (name text)")
        await conn.execute("INSERT INTO legacy VALUES ('kept')")

    await postgres.restart()
    roles = await _roles(postgres)
    assert roles["tollgate"] == {"login": True, "super": False, "groups": ["tollgate_app"]}
    assert roles["database owner"] == "tollgate_owner"
    async with _open(asyncpg.connect(postgres.owner_url)) as conn:
        assert (
            await conn.fetchval(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'legacy'"
            )
            == "tollgate_owner"
        )
        assert await conn.fetchval("SELECT name FROM legacy") == "kept"


async def _login(dsn: str) -> str:
    """``current_user`` of a fresh connection to ``dsn``, with no password from elsewhere
    (``PGPASSWORD`` is cleared by the caller, and no ``.pgpass`` is read)."""
    no_passfile = "/nonexistent/tollgate-test/.pgpass"
    async with _open(asyncpg.connect(dsn, passfile=no_passfile, timeout=10)) as conn:
        user: str = await conn.fetchval("SELECT current_user")
        return user


async def _assert_locked_down(server: LocalPostgres) -> None:
    """The superuser only over the socket, the owner only with its password."""
    tcp = f"127.0.0.1:{server.port}"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="rejects"):
        await _login(f"postgresql://postgres@{tcp}/postgres")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="rejects"):
        await _login(f"postgresql://postgres@{tcp}/tollgate")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _login(f"postgresql://tollgate_owner:wrong@{tcp}/tollgate")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _login(f"postgresql://tollgate_owner@{tcp}/tollgate")
    assert await _login(server.owner_url) == "tollgate_owner"
    assert await _login(server.url) == "tollgate"
    async with _open(server.connect_admin()) as admin:
        assert await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")


async def test_postgres_superuser_only_over_the_socket_owner_only_with_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    server = LocalPostgres(tmp_path / "pg" / "data", free_port(), durable=False)
    async with _running(server):
        await _assert_locked_down(server)
        password_file = tmp_path / "pg" / "data.owner-password"
        assert server.owner_password_file == password_file
        assert _mode(password_file) == 0o600
        assert password_file.read_text().strip() == server.owner_password
        assert server.owner_password not in server.log_file.read_text()

        password = server.owner_password
        await server.restart()
        assert server.owner_password == password, "the password is kept across restarts"
        await _assert_locked_down(server)


#: pg_hba.conf as ``initdb --auth=trust`` writes it (what clusters of the stack had).
TRUST_EVERYWHERE = """\
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
"""


async def test_postgres_locks_down_a_cluster_created_with_trust_everywhere(
    postgres: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old ``.tollgate/pgdata``: trust for everyone over TCP, an owner with no
    password and no password file. The next start closes it, in place."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    await _as_superuser(
        postgres,
        "CREATE TABLE kept (name text)",
        "INSERT INTO kept VALUES ('old data')",
        "ALTER ROLE tollgate_owner PASSWORD NULL",
    )
    await postgres.stop()
    hba = postgres.data_dir / "pg_hba.conf"
    hba.write_text(TRUST_EVERYWHERE)  # keeps the file's owner, the server's account
    postgres.owner_password_file.unlink()

    await postgres.start()
    await _assert_locked_down(postgres)
    assert _mode(postgres.owner_password_file) == 0o600
    assert "127.0.0.1/32            trust" not in hba.read_text()
    async with _open(postgres.connect_admin()) as admin:
        assert await admin.fetchval("SELECT name FROM kept") == "old data"


async def _registered_attributes(server: TemporalDevServer) -> dict[str, str]:
    client = await server.connect()
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    return {
        name: IndexedValueType.Name(value).removeprefix("INDEXED_VALUE_TYPE_")
        for name, value in listed.custom_attributes.items()
    }


def _expected(attributes: dict[str, str]) -> dict[str, str]:
    return {name: kind.upper() for name, kind in attributes.items()}


async def test_temporal_dev_server_headless(tmp_path: Path) -> None:
    server = TemporalDevServer(free_port(), None, log_file=tmp_path / "temporal.log")
    assert server.ui_url is None
    async with _running(server):
        assert server.address == f"127.0.0.1:{server.port}"
        registered = await _registered_attributes(server)
        assert _expected(SEARCH_ATTRIBUTES).items() <= registered.items()
    assert server.returncode == 0
    assert port_is_free(LOCALHOST, server.port)


async def test_temporal_registers_new_attributes_on_an_existing_db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI ignores --search-attribute for an existing db file; start() fills the gap."""
    first, *rest = SEARCH_ATTRIBUTES.items()
    assert rest, "the test needs at least two search attributes"
    server = TemporalDevServer(free_port(), None, db_filename=tmp_path / "temporal.db")

    # An older Tollgate knew only the first attribute.
    monkeypatch.setattr(stack_temporal, "SEARCH_ATTRIBUTES", dict([first]))
    await server.start()
    server.kill()  # Also: a crash must not keep the db file from being reopened.

    monkeypatch.setattr(stack_temporal, "SEARCH_ATTRIBUTES", dict(SEARCH_ATTRIBUTES))
    await server.start()
    try:
        registered = await _registered_attributes(server)
        assert _expected(SEARCH_ATTRIBUTES).items() <= registered.items()
    finally:
        server.kill()

    # Same name, other type: refuse rather than run with a broken attribute.
    name, kind = first
    monkeypatch.setattr(
        stack_temporal, "SEARCH_ATTRIBUTES", {name: "Int" if kind != "Int" else "Keyword"}
    )
    with pytest.raises(StackError, match=f"search attribute {name} is registered as"):
        await server.start()
    assert not server.running


async def test_sandbox_process(tmp_path: Path) -> None:
    sandbox = SandboxProcess(free_port(), log_file=tmp_path / "sandbox.log")
    async with _running(sandbox):
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{sandbox.url}/health")
        assert response.status_code == 200
    assert not sandbox.running


def _fake_worker(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "worker.py").write_text(textwrap.dedent(body))
    return directory


async def test_worker_ready_line_and_env(tmp_path: Path) -> None:
    project = _fake_worker(
        tmp_path / "project",
        """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("connecting to", os.environ["TEMPORAL_ADDRESS"])
        time.sleep(0.3)
        print("worker ready")
        time.sleep(60)
        """,
    )
    log = tmp_path / "worker.log"
    log.write_text("worker ready (a previous run's line must not count)\n")
    worker = WorkerProcess({"TEMPORAL_ADDRESS": "127.0.0.1:1"}, project, log_file=log)
    await worker.start()
    assert worker.running
    assert "connecting to 127.0.0.1:1" in worker.log_tail()
    await worker.stop()
    assert worker.returncode == 0


async def test_worker_that_dies_is_reported(tmp_path: Path) -> None:
    project = _fake_worker(tmp_path, "import sys; print('no database'); sys.exit(3)")
    worker = WorkerProcess({}, project, log_file=tmp_path / "worker.log")
    with pytest.raises(StackError, match=r"(?s)exited with status 3.*no database"):
        await worker.start()


#: A worker that is ready at once and exits with status 3 after as many seconds as the
#: file ``lifetime`` says; while a file ``broken`` exists it exits before being ready.
SHORT_LIVED_WORKER = """
    import pathlib, sys, time
    if pathlib.Path("broken").exists():
        print("cannot reach the database")
        sys.exit(1)
    print("worker ready")
    time.sleep(float(pathlib.Path("lifetime").read_text()))
    sys.exit(3)
    """


@asynccontextmanager
async def _supervised_short_lived_worker(
    tmp_path: Path, backoff: RestartBackoff, *, break_after_start: bool = False
) -> AsyncIterator[tuple[Path, WorkerProcess, Supervisor]]:
    """A :data:`SHORT_LIVED_WORKER` (each run 0.3 s long) started and then supervised with
    ``backoff``; with ``break_after_start``, its runs after the first fail before they are
    ready. Yields (its project directory, the worker, the supervisor); both are stopped
    after the block, also when a check in it fails."""
    project = _fake_worker(tmp_path / "project", SHORT_LIVED_WORKER)
    (project / "lifetime").write_text("0.3")
    worker = WorkerProcess({}, project, log_file=tmp_path / "worker.log")
    supervisor = Supervisor(worker, backoff=backoff)
    await worker.start()
    if break_after_start:
        (project / "broken").touch()
    supervisor.start()
    try:
        yield project, worker, supervisor
    finally:
        await supervisor.stop()
        await worker.stop()


async def test_supervisor_backs_off_exponentially_and_resets_after_a_healthy_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollgate_dev.stack")
    backoff = RestartBackoff(initial=0.05, maximum=0.2, reset_after=1.0)
    async with _supervised_short_lived_worker(tmp_path, backoff) as (project, worker, supervisor):
        await eventually(
            lambda: len(supervisor.exits) >= 4, within=30, every=0.05, what="four exits"
        )
        assert [e.restart_in for e in supervisor.exits[:4]] == [0.05, 0.1, 0.2, 0.2]
        first = supervisor.exits[0]
        assert first.returncode == 3 and first.uptime < 1.0
        assert first.log_file == tmp_path / "worker.log"
        assert str(first) in caplog.text and "exited with status 3" in caplog.text

        # A run that outlives reset_after is healthy: the next wait starts over.
        (project / "lifetime").write_text("1.5")
        await eventually(
            lambda: any(e.uptime >= 1.0 for e in supervisor.exits),
            within=30,
            every=0.05,
            what="a long run to end",
        )
        healthy = next(e for e in supervisor.exits if e.uptime >= 1.0)
        assert healthy.restart_in == 0.05
        assert supervisor.restarts >= 4
    restarts = supervisor.restarts
    await asyncio.sleep(0.5)
    assert supervisor.restarts == restarts and not worker.running, "nothing after stop()"


async def test_supervisor_retries_a_restart_that_does_not_come_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollgate_dev.stack")
    backoff = RestartBackoff(initial=0.05, maximum=0.4, reset_after=60)
    async with _supervised_short_lived_worker(tmp_path, backoff, break_after_start=True) as (
        project,
        worker,
        supervisor,
    ):
        await eventually(
            lambda: caplog.text.count("did not come back") >= 2,
            within=30,
            every=0.05,
            what="failed restarts",
        )
        assert "cannot reach the database" in caplog.text
        assert supervisor.restarts == 0 and len(supervisor.exits) == 1
        (project / "broken").unlink()
        await eventually(
            lambda: supervisor.restarts == 1, within=30, every=0.05, what="a restart that comes up"
        )
        assert worker.running or worker.returncode == 3


async def test_stack_restarts_a_killed_worker_and_stops_supervising_on_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 of the worker: reported with its signal and log, restarted (a new pid
    that polls Temporal again), and stopping the stack stops both for good."""
    caplog.set_level(logging.INFO, logger="tollgate_dev.stack")
    backoff = RestartBackoff(initial=0.2, maximum=1.0, reset_after=30)
    stack = _stack(tmp_path, restart_backoff=backoff)
    async with stack:
        worker, supervisor = stack.worker, stack.supervisor
        assert worker is not None and supervisor is not None and supervisor.running
        killed = worker.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        await eventually(
            lambda: supervisor.restarts == 1, within=90, every=0.05, what="the worker to come back"
        )

        (gone,) = supervisor.exits
        assert (gone.pid, gone.returncode) == (killed, -signal.SIGKILL)
        assert gone.log_file == stack.log_dir / "worker.log"
        assert f"worker (pid {killed}) killed by SIGKILL" in caplog.text
        assert str(stack.log_dir / "worker.log") in caplog.text
        restarted = worker.pid
        assert restarted is not None and restarted != killed
        assert "worker ready" in worker.log_tail()
        record = json.loads((stack.state_dir / "run" / "worker.json").read_text())
        assert record["pid"] == restarted, "a crash after this reaps the new worker"

        # Ready means polling: the new process is among the task queue's pollers.
        client = await stack.temporal.connect()
        queue = Settings().task_queue

        async def polls() -> bool:
            described = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace="default",
                    task_queue=TaskQueue(name=queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                )
            )
            return any(p.identity.startswith(f"{restarted}@") for p in described.pollers)

        deadline = asyncio.get_running_loop().time() + 30
        while not await polls():
            assert asyncio.get_running_loop().time() < deadline, "the new worker never polled"
            await asyncio.sleep(0.2)
    assert not supervisor.running
    assert not worker.running and worker.returncode == 0, "stopped cleanly, not killed"
    assert supervisor.restarts == 1, "no restart while stopping"
    assert not psutil.pid_exists(restarted) or psutil.Process(restarted).status() == "zombie"
    for log in stack.log_dir.glob("*.log"):
        assert _mode(log) == 0o600, log


#: A fake worker that says it is ready and waits to be stopped.
_READY_THEN_WAITING = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("worker ready")
time.sleep(60)
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_log_files_are_created_private_and_old_ones_tightened(tmp_path: Path) -> None:
    project = _fake_worker(tmp_path / "project", _READY_THEN_WAITING)
    earlier = tmp_path / "logs" / "worker.log"
    earlier.parent.mkdir()
    earlier.write_text("a line from an earlier run\n")
    earlier.chmod(0o644)
    fresh = tmp_path / "fresh" / "worker.log"
    for log in (earlier, fresh):
        worker = WorkerProcess({}, project, log_file=log)
        async with _running(worker):
            assert _mode(log) == 0o600, log
    assert _mode(fresh.parent) == 0o700, "a directory made for a log is private too"
    assert "a line from an earlier run" in earlier.read_text(), "appended, not replaced"


async def test_a_log_past_its_bound_is_set_aside_when_its_process_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack left running for days restarts its worker now and then; the worker's log
    does not grow without end: past the bound it becomes ``worker.log.1``."""
    monkeypatch.setattr(stack_process, "LOG_ROTATE_BYTES", 1000)
    project = _fake_worker(tmp_path / "project", _READY_THEN_WAITING)
    log = tmp_path / "logs" / "worker.log"
    log.parent.mkdir()
    log.write_text("a short earlier run\n")
    worker = WorkerProcess({}, project, log_file=log)
    async with _running(worker):
        pass
    assert log.read_text().startswith("a short earlier run"), "under the bound: appended"
    with log.open("a") as fh:
        fh.write("a long earlier run\n" * 100)
    async with _running(worker):
        pass
    aside = log.with_name("worker.log.1")
    assert "a long earlier run" in aside.read_text()
    assert "a long earlier run" not in log.read_text() and "worker ready" in log.read_text()
    assert _mode(log) == 0o600


def _stack(tmp_path: Path, **overrides: object) -> LocalStack:
    options: dict[str, object] = {
        "temporal_port": free_port(),
        "ui_port": None,
        "postgres_port": free_port(),
        "sandbox_port": free_port(),
        "temporal_db_file": False,
        "durable": False,
    }
    options.update(overrides)
    return LocalStack(tmp_path / "state", **options)  # type: ignore[arg-type]


async def test_stack_names_the_busy_port_and_its_variable(
    tmp_path: Path, listening_port: int
) -> None:
    stack = _stack(tmp_path, sandbox_port=listening_port)
    with pytest.raises(StackError, match=f"port {listening_port} .*SANDBOX_URL"):
        await stack.start()
    assert not any(part.running for part in stack.components)


async def test_stack_state_directory_and_its_logs_are_private(
    tmp_path: Path, listening_port: int
) -> None:
    """A state directory an older Tollgate left world-readable is tightened on start,
    even when the start then fails (here: on a busy port)."""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    old_log = state / "logs" / "temporal.log"
    old_log.write_text("from an older run\n")
    old_db = state / "temporal.db"
    old_db.write_bytes(b"SQLite format 3\0")
    for path, mode in (
        (state, 0o755),
        (state / "logs", 0o755),
        (old_log, 0o644),
        (old_db, 0o644),
    ):
        path.chmod(mode)

    stack = _stack(tmp_path, sandbox_port=listening_port)
    with pytest.raises(StackError, match="already in use"):
        await stack.start()

    assert stack.postgres is not None
    server_gid = stack.postgres.server_gid()
    if server_gid is None:
        assert _mode(state) == 0o700
    else:
        # As root, Postgres runs as its own account and must pass through to pgdata.
        assert (_mode(state), state.stat().st_gid) == (0o710, server_gid)
    assert _mode(state / "logs") == 0o700
    assert _mode(old_log) == 0o600
    assert _mode(old_db) == 0o600
    assert _mode(state / "stack.lock") == 0o600


async def test_files_a_child_creates_are_private(tmp_path: Path) -> None:
    project = _fake_worker(
        tmp_path / "project",
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        open("made-by-the-child", "w").close()
        print("worker ready")
        time.sleep(60)
        """,
    )
    worker = WorkerProcess({}, project, log_file=tmp_path / "worker.log")
    await worker.start()
    await worker.stop()
    assert _mode(project / "made-by-the-child") == 0o600


async def test_stack_reaps_processes_left_by_a_crashed_run(
    tmp_path: Path, listening_port: int
) -> None:
    """A run that died without stopping its children (no pdeathsig: macOS) leaves pid
    records; the next start stops those processes before checking ports."""
    orphan = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", start_new_session=True
    )
    try:
        run_dir = tmp_path / "state" / "run"
        run_dir.mkdir(parents=True)
        record = {
            "pid": orphan.pid,
            "create_time": psutil.Process(orphan.pid).create_time(),
            "signal": int(signal.SIGTERM),
        }
        (run_dir / "sandbox.json").write_text(json.dumps(record))
        stack = _stack(tmp_path, sandbox_port=listening_port)
        with pytest.raises(StackError, match="already in use"):
            await stack.start()
        assert await asyncio.wait_for(orphan.wait(), 5) == -signal.SIGTERM
        assert not (run_dir / "sandbox.json").exists()
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


async def test_one_stack_per_state_directory(tmp_path: Path, listening_port: int) -> None:
    holder = _stack(tmp_path, sandbox_port=listening_port)
    holder._acquire_lock()
    try:
        with pytest.raises(StackError, match=f"already running from .*pid {os.getpid()}"):
            await _stack(tmp_path).start()
    finally:
        holder._release_lock()


def test_from_settings_reads_ports_and_external_database(tmp_path: Path) -> None:
    settings = Settings(
        temporal_address="127.0.0.1:27233",
        temporal_ui_url="http://localhost:28233",
        sandbox_url="http://127.0.0.1:28081",
        state_dir=tmp_path,
    )
    stack = LocalStack.from_settings(settings)
    assert stack.temporal.port == 27233
    assert stack.temporal.ui_port == 28233
    assert stack.sandbox.port == 28081
    assert stack.postgres is not None and stack.postgres.data_dir == tmp_path / "pgdata"
    assert stack.env() == {
        "TEMPORAL_ADDRESS": "127.0.0.1:27233",
        "DATABASE_URL": stack.postgres.url,
        "DATABASE_OWNER_URL": stack.postgres.owner_url,
        "SANDBOX_URL": "http://127.0.0.1:28081",
        "TEMPORAL_UI_URL": "http://127.0.0.1:28233",
    }
    assert stack.database_owner_url == stack.postgres.owner_url != stack.database_url

    external = "postgresql://me@db.example:5432/tollgate"
    stack = LocalStack.from_settings(Settings(database_url=external), headless=True)
    assert stack.postgres is None
    assert stack.database_url == stack.database_owner_url == external
    assert "TEMPORAL_UI_URL" not in stack.env()
    assert "DATABASE_OWNER_URL" not in stack.env()

    owner = "postgresql://schema-owner@db.example:5432/tollgate"
    stack = LocalStack.from_settings(
        Settings(database_url=external, database_owner_url=owner), headless=True
    )
    assert (stack.database_url, stack.database_owner_url) == (external, owner)
    assert stack.env()["DATABASE_OWNER_URL"] == owner

    with pytest.raises(StackError, match="DATABASE_OWNER_URL is set but DATABASE_URL is not"):
        LocalStack.from_settings(Settings(database_owner_url=owner))

    with pytest.raises(StackError, match="TEMPORAL_ADDRESS"):
        LocalStack.from_settings(Settings(temporal_address="temporal.example:7233"))


async def test_whole_stack(tmp_path: Path) -> None:
    """Postgres, Temporal, sandbox, migrations and the real worker, then a clean stop.

    The worker migrates at start-up too: it only comes up if it does so as the owner
    (DATABASE_OWNER_URL), since the application role may not touch the schema.
    """
    async with _stack(tmp_path) as stack:
        assert stack.worker is not None and stack.worker.running
        assert stack.applied_migrations == sorted(p.name for p in SCHEMA_DIR.glob("*.sql"))
        async with _open(asyncpg.connect(stack.database_owner_url)) as conn:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
                stack.applied_migrations
            )
        async with _open(asyncpg.connect(stack.database_url)) as conn:
            assert await conn.fetchval("SELECT current_user") == "tollgate"
            assert await conn.fetchval("SELECT count(*) FROM orders") == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM schema_migrations")
        assert sorted(stack.env()) == [
            "DATABASE_OWNER_URL",
            "DATABASE_URL",
            "SANDBOX_URL",
            "TEMPORAL_ADDRESS",
        ]
    assert not any(part.running for part in stack.components)
    assert not list((stack.state_dir / "run").glob("*.json"))
