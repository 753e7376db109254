"""Every CLI command, driven with generated argument lists, fails cleanly or succeeds.

For any argument list (random strings, huge and tiny numbers, unicode digits, control
characters, missing or repeated flags): the exit status is 0, 1 or 2; nothing on
stderr is a traceback; and when the status is 2 (bad input) not a single row was
written. The CLI runs in-process (``tollgate.ops.cli.main``) in a thread, with its own event
loop, while the test's loop keeps serving the sandbox and the worker it talks to.

``demo`` is left out: it takes only ``--json`` and runs nine scripted scenarios that
script faults through the sandbox's admin API; ``make demo`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tollgate_dev.commands  # noqa: F401  (load and demo join the CLI)
from tests.conftest import Harness
from tollgate.ops import cli

TABLES = ("orders", "messages", "devices", "order_transitions", "message_transitions")

#: Text an attacker or a careless operator types: control characters, markup, unicode
#: digits, separators of derived ids, huge numbers, nothing at all.
HOSTILE = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "",
            " ",
            "x:recovery",
            "a\r\nBcc: attacker@example.com",
            "[/x]",
            "[bold]x",
            "\x1b[31mred",
            "\u202eevil",
            "²",
            "٣",
            "1e30",
            "-1",
            "0",
            "0.001",
            "100000000000000000",
            "9" * 40,
            "9999999999d",
            "NaN",
            "inf",
            "../../etc/passwd",
            "%s%n",
            "🙂",
        ]
    ),
)
IDS = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True), HOSTILE)
AMOUNTS = st.one_of(st.sampled_from(["5", "19.99", "100000.00", "0.5"]), HOSTILE)
ITEMS = st.one_of(st.sampled_from(["WIDGET:1", "GADGET:2", "NOPE:1", "WIDGET:0"]), HOSTILE)
DURATIONS = st.one_of(st.sampled_from(["1s", "30s", "500ms", "2h", "0s", "25d"]), HOSTILE)
COUNTS = st.sampled_from(["1", "0", "-1", "²", "1000000000", "abc", "1e3"])

#: Each command: its words, positional argument strategies, and flag strategies.
COMMANDS: dict[tuple[str, ...], tuple[list[Any], dict[str, Any]]] = {
    ("order", "create"): (
        [],
        {
            "--customer": IDS,
            "--item": ITEMS,
            "--amount": AMOUNTS,
            "--currency": st.one_of(st.sampled_from(["USD", "JPY", "usd"]), HOSTILE),
            "--order-id": IDS,
        },
    ),
    ("order", "cancel"): ([IDS], {"--reason": HOSTILE}),
    ("order", "status"): ([IDS], {}),
    ("device", "register"): (
        [],
        {
            "--user": IDS,
            "--token": HOSTILE,
            "--platform": st.one_of(st.sampled_from(["ios", "web"]), HOSTILE),
            "--device-id": IDS,
        },
    ),
    ("device", "remove"): ([IDS], {}),
    ("message", "send"): (
        [],
        {
            "--sender": IDS,
            "--recipient": IDS,
            "--body": HOSTILE,
            "--deadline": DURATIONS,
            "--email": st.one_of(st.just("x@example.com"), HOSTILE),
            "--message-id": IDS,
        },
    ),
    ("message", "confirm"): ([IDS], {"--device": IDS}),
    ("message", "read"): ([IDS], {"--device": IDS}),
    ("message", "recall"): ([IDS], {"--reason": HOSTILE}),
    ("message", "status"): ([IDS], {}),
    ("reconcile",): ([], {"--grace": DURATIONS, "--lookback": DURATIONS}),
    ("search-token",): ([HOSTILE], {}),
    ("load", "orders"): ([], {"--count": COUNTS, "--concurrency": COUNTS}),
    ("load", "messages"): ([], {"--count": COUNTS, "--rate": COUNTS}),
}


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    """One command line: a command, some of its arguments (or none), maybe --json."""
    words = draw(st.sampled_from(sorted(COMMANDS)))
    positional, flags = COMMANDS[words]
    args = list(words)
    for strategy in positional:
        if draw(st.booleans()) or len(args) == len(words):
            args.append(draw(strategy))
    if words[0] == "load":
        # always a count: the default (100 lifecycles) would make one example a load test
        args += ["--count", draw(COUNTS)]
    if flags:
        for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=len(flags) + 1)):
            args += [flag, draw(flags[flag])]
    if draw(st.booleans()):
        args.append("--json")
    return args


_cli_lock = threading.Lock()


def _run_cli(args: list[str]) -> tuple[int, str, str]:
    """``starter.py ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _cli_lock, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


async def _counts(database_url: str) -> tuple[int, ...]:
    conn = await asyncpg.connect(database_url)
    try:
        return tuple([await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES])
    finally:
        await conn.close()


async def test_every_command_fails_cleanly_whatever_its_arguments(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in h.process_env().items():
        monkeypatch.setenv(name, value)
    seen: dict[int, int] = {}

    @settings(
        max_examples=int(os.environ.get("TOLLGATE_CLI_FUZZ_EXAMPLES", "100")),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(args=argv())
    def one_command_line(args: list[str]) -> None:
        before = asyncio.run(_counts(h.settings.database_url))
        if os.environ.get("TOLLGATE_CLI_FUZZ_TRACE"):
            print("cli:", args, flush=True)
        code, out, err = _run_cli(args)
        seen[code] = seen.get(code, 0) + 1
        assert code in (0, 1, 2), (args, code, err)
        assert "Traceback" not in err + out, (args, err)
        lines = err.strip().splitlines()
        if code == 2 or lines:
            # bad input, and any refusal that explains itself on stderr: one clear line
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        if code == 2:
            after = asyncio.run(_counts(h.settings.database_url))
            assert after == before, (args, "bad input wrote rows", before, after)

    await asyncio.to_thread(one_command_line)
    assert seen.get(2, 0) > 0 and seen.get(0, 0) + seen.get(1, 0) > 0, seen
