"""The gate in Postgres under random concurrent writers: a Hypothesis state machine.

Each step races a batch of 2-5 writers at the same few order rows. A writer names a
version (fresh from the model, read from the row just before writing, stale, or one
ahead of the model, hoping a peer moves the row there first) and a target (a legal
successor of the status it believes, or any status at all: illegal edges, same-status
writes, moves out of terminal states). Half write plain SQL, the way a person at psql
would, and may keep the row locked for a moment before committing; the other half go
through ``apply_transition`` (tests/conftest.py). A third rule replays an accepted ``apply_transition``
request, as a retried activity does.

After every step the test checks each outcome against what else happened in the batch
and against the model of accepted writes it keeps, then checks Postgres: the row is in
a state reachable from PENDING, its audit trail is a path in the graph starting with the
creation, its version counts every accepted write, and the row and audit are exactly
what the model predicts. No stale or illegal write ever applies, none is lost.

Hypothesis rules are synchronous, so the writers run on an event loop of the test's own,
in a background thread, with their own asyncpg pool (pytest-asyncio's session loop is
not running while a synchronous test runs). Every example creates fresh order ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import uuid
from collections import deque
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg
import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import apply_transition
from tollgate import gate, postgres
from tollgate.errors import IllegalTransition, OrderCancelled, VersionConflict
from tollgate.orders import store as order_store
from tollgate.orders.models import OrderInput, TransitionInput
from tollgate.orders.states import ORDER_EDGES, OrderStatus

S = OrderStatus
T = TypeVar("T")

#: Orders per example: few, so that writers collide.
MAX_ORDERS = 3
#: How long one batch (or one check) may take before the test gives up on it.
STEP_TIMEOUT = 30.0


def _reachable(start: OrderStatus) -> frozenset[OrderStatus]:
    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for a, b in ORDER_EDGES:
            if a == node and b not in seen:
                seen.add(b)
                queue.append(b)
    return frozenset(seen)


REACHABLE = _reachable(S.PENDING)


def _successors(status: OrderStatus) -> list[OrderStatus]:
    """Legal next states, forward ones first (declaration order: pipeline, then the rest)."""
    order = list(S)
    return sorted((b for a, b in ORDER_EDGES if a == status), key=order.index)


def _accepted(from_status: OrderStatus, to_status: OrderStatus) -> bool:
    """What the gate must accept: an edge, or a same-status write to a non-terminal row."""
    if from_status == to_status:
        return not from_status.terminal
    return (from_status, to_status) in ORDER_EDGES


def _trail(history: list[OrderStatus]) -> list[tuple[Any, ...]]:
    """The audit a row must have, given its status at every version (index = version - 1)."""
    trail: list[tuple[Any, ...]] = [(None, S.PENDING, None, 1)]
    for version in range(2, len(history) + 1):
        before, after = history[version - 2], history[version - 1]
        if before != after:
            trail.append((before, after, version - 1, version))
    return trail


class LoopThread:
    """An event loop of the test's own, run in a thread, for the synchronous rules."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="gate-properties-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


Basis = Literal["fresh", "read", "stale", "ahead"]
Via = Literal["sql", "gate"]
Outcome = Literal["applied", "refused", "missed"]
BatchMode = Literal["at once", "in turn"]

#: Most batches race their writers with ``asyncio.gather``; some run them in turn. The
#: shrinker moves towards "in turn" (the first element), so a failure that needs no race
#: is reported as a program that fails the same way every time it is replayed; one that
#: needs the race stays "at once" (and Hypothesis may then call it flaky, as races are).
BATCH_MODES: st.SearchStrategy[BatchMode] = st.sampled_from(
    ["in turn", "at once", "at once", "at once"]
)


@dataclass(frozen=True)
class Writer:
    """One writer of a batch, as Hypothesis draws it."""

    #: Which of the example's orders (modulo their number).
    order: int
    #: Where its expected version comes from: the model ("fresh"), a read of the row just
    #: before writing ("read"), ``staleness`` versions behind the model ("stale"), or
    #: one ahead of the model ("ahead").
    basis: Basis
    staleness: int
    #: A status, or an index into the legal successors of the status it believes.
    target: OrderStatus | int
    via: Via
    #: Plain SQL writers keep the row locked this long after updating it.
    hold_ms: int
    #: How long the writer waits before starting, so that batches interleave differently.
    delay_ms: int


@dataclass(frozen=True)
class Attempt:
    """What one writer tried, and what the gate did with it."""

    writer: Writer
    order_id: str
    expected: int
    believed: OrderStatus
    to: OrderStatus
    transition_id: str | None
    outcome: Outcome
    #: The version the row got, for an applied write.
    version: int | None = None


def _applied_version(a: Attempt) -> int:
    """The version an applied write gave the row; every applied attempt has one."""
    assert a.version is not None, f"an applied write without a version: {a}"
    return a.version


def _writers() -> st.SearchStrategy[list[Writer]]:
    writer = st.builds(
        Writer,
        order=st.integers(0, MAX_ORDERS - 1),
        basis=st.sampled_from(["fresh", "read", "stale", "ahead"]),
        staleness=st.integers(1, 3),
        # Mostly legal moves, mostly forward (index 0), so rows get deep into the graph
        # before they end; otherwise any status at all.
        target=st.one_of(
            st.sampled_from([0, 0, 0, 1, 2]), st.sampled_from([0, 0, 0, 1, 2]), st.sampled_from(S)
        ),
        via=st.sampled_from(["sql", "gate"]),
        hold_ms=st.sampled_from([0, 0, 5]),
        delay_ms=st.sampled_from([0, 0, 1, 3]),
    )
    return st.lists(writer, min_size=2, max_size=5)


@settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
)
class GateMachine(RuleBasedStateMachine):
    def __init__(self, loop: LoopThread, pool: asyncpg.Pool) -> None:
        super().__init__()
        self.loop = loop
        self.pool = pool
        self.order_ids: list[str] = []
        #: The model: each order's status at every version (index = version - 1).
        self.history: dict[str, list[OrderStatus]] = {}
        #: ``last_transition_id`` as accepted writes left it (plain SQL does not set it).
        self.last_tid: dict[str, str | None] = {}
        #: Accepted ``apply_transition`` requests, for the replay rule.
        self.gate_writes: dict[str, list[TransitionInput]] = {}

    # -- rules ---------------------------------------------------------------------------

    @initialize(count=st.integers(1, MAX_ORDERS))
    def create_orders(self, count: int) -> None:
        self.order_ids = self.loop.run(self._create(count))
        for order_id in self.order_ids:
            self.history[order_id] = [S.PENDING]
            self.last_tid[order_id] = None
            self.gate_writes[order_id] = []

    @rule(mode=BATCH_MODES, writers=_writers())
    def race(self, mode: BatchMode, writers: list[Writer]) -> None:
        self._race(mode, writers)

    @rule(mode=BATCH_MODES, order=st.integers(0, MAX_ORDERS - 1), writers=_writers())
    def race_on_one_order(self, mode: BatchMode, order: int, writers: list[Writer]) -> None:
        self._race(mode, [dataclasses.replace(w, order=order) for w in writers])

    # No precondition on what was accepted: which writer wins a race varies from run to
    # run, and Hypothesis needs the same draws to choose the same rules.
    @rule(order=st.integers(0, MAX_ORDERS - 1), pick=st.integers(0, 20))
    def replay_gate_write(self, order: int, pick: int) -> None:
        """A retried activity: the same request again. Only the latest write is 'ours',
        and even that one yields to a cancellation recorded since it applied (a stop
        keeps the row's last transition id)."""
        candidates = [o for o in self.order_ids if self.gate_writes[o]]
        if not candidates:
            return
        order_id = candidates[order % len(candidates)]
        req = self.gate_writes[order_id][pick % len(self.gate_writes[order_id])]
        result = self.loop.run(self._replay(req))
        current = len(self.history[order_id])
        note(f"replay {req.transition_id} (v{req.expected_version}) -> {result!r}")
        now = self.history[order_id][-1]
        if req.transition_id == self.last_tid[order_id] and now.cancelling and now != req.to_status:
            assert result == ("cancelled", current), (
                f"a replay of a request cancelled since it applied must yield: {result}"
            )
        elif req.transition_id == self.last_tid[order_id]:
            assert result == ("already_applied", current), (
                f"a replay of the last accepted request must report it, writing nothing: {result}"
            )
        else:
            assert result[0] in ("conflict", "cancelled"), (
                f"a replay of an older request must be refused: {result}"
            )
            assert result[1] == current

    # -- checks --------------------------------------------------------------------------

    @invariant()
    def postgres_holds_what_the_model_says(self) -> None:
        if not self.order_ids:
            return
        snapshot = self.loop.run(self._snapshot())
        for order_id, (row, audit) in snapshot.items():
            history = self.history[order_id]
            assert row is not None
            assert row.status in REACHABLE, f"{order_id} is in unreachable {row.status}"

            # The audit trail is a path in the graph, starting with the creation.
            first = audit[0]
            assert (first.from_status, first.to_status, first.from_version, first.to_version) == (
                None,
                S.PENDING,
                None,
                1,
            ), f"{order_id}: first audit row is not the creation: {first}"
            same_status = sum(1 for v in range(1, len(history)) if history[v] == history[v - 1])
            for prev, cur in itertools.pairwise(audit):
                assert cur.from_status is not None
                assert (cur.from_status, cur.to_status) in ORDER_EDGES, (
                    f"{order_id}: audit records illegal {cur.from_status} -> {cur.to_status}"
                )
                assert cur.from_status == prev.to_status, f"{order_id}: audit breaks at {cur}"
                assert cur.from_version is not None, f"{order_id}: {cur}"
                assert cur.to_version == cur.from_version + 1, f"{order_id}: {cur}"
                # Between two transitions the row may only have had same-status writes.
                assert cur.from_version is not None and cur.from_version >= prev.to_version
                assert all(
                    history[v - 1] == prev.to_status
                    for v in range(prev.to_version, cur.from_version + 1)
                ), (
                    f"{order_id}: versions {prev.to_version}..{cur.from_version} not all {prev.to_status}"
                )
            assert audit[-1].to_status == row.status
            assert audit[-1].to_version <= row.version

            # No update lost: every accepted write is counted in the version.
            assert row.version == 1 + (len(audit) - 1) + same_status, (
                f"{order_id}: version {row.version}, but {len(audit) - 1} transitions"
                f" and {same_status} same-status writes were accepted"
            )
            # The model of accepted writes is what Postgres holds.
            assert (row.status, row.version, row.last_transition_id) == (
                history[-1],
                len(history),
                self.last_tid[order_id],
            ), f"{order_id}: Postgres has {row.status} v{row.version}, model {history}"
            got = [(a.from_status, a.to_status, a.from_version, a.to_version) for a in audit]
            assert got == _trail(history), f"{order_id}: audit {got} != model {_trail(history)}"

    def _settle(self, attempts: list[Attempt]) -> None:
        """Fold a batch into the model, checking each outcome could have happened."""
        for order_id in dict.fromkeys(a.order_id for a in attempts):
            mine = [a for a in attempts if a.order_id == order_id]
            history = self.history[order_id]
            start = len(history)
            applied = sorted((a for a in mine if a.outcome == "applied"), key=_applied_version)
            for a in applied:
                assert a.expected >= start, (
                    f"a stale write applied: expected v{a.expected}, row was at v{start}: {a}"
                )
                assert a.version == len(history) + 1, (
                    f"lost update: write got v{a.version}, model is at v{len(history)}: {a}"
                )
                assert a.expected == len(history), (
                    f"lost update: a write for v{a.expected} applied over one it never saw: {a}"
                )
                assert _accepted(history[-1], a.to), (
                    f"an illegal edge applied: {history[-1]} -> {a.to}: {a}"
                )
                history.append(a.to)
                if a.transition_id is not None:
                    self.last_tid[order_id] = a.transition_id
                    self.gate_writes[order_id].append(
                        TransitionInput(
                            order_id=order_id,
                            expected_version=a.expected,
                            to_status=a.to,
                            transition_id=a.transition_id,
                            actor="prop:gate",
                        )
                    )
            final = len(history)
            for a in mine:
                if a.outcome == "refused":
                    # The trigger only sees a row whose version matched the WHERE clause.
                    assert 1 <= a.expected <= final, f"refused at a version never held: {a}"
                    assert not _accepted(history[a.expected - 1], a.to), (
                        f"a legal write refused: {history[a.expected - 1]} -> {a.to}: {a}"
                    )
                elif a.outcome == "missed":
                    # The row sat at ``final`` from when it got there to the end of the batch;
                    # a writer that saw it there (or had it from the start) must have matched.
                    saw_it = a.writer.basis == "read" or a.expected == start
                    assert not (a.expected == final and saw_it), (
                        f"a write on the current version matched no row: {a}"
                    )

    # -- async parts ---------------------------------------------------------------------

    def _race(self, mode: BatchMode, writers: list[Writer]) -> None:
        plans = [self._plan(w) for w in writers]
        attempts = self.loop.run(self._run_batch(mode, plans))
        for a in attempts:
            note(
                f"  {a.order_id} v{a.expected} {a.believed}->{a.to} via {a.writer.via}"
                f" ({a.writer.basis}): {a.outcome}{'' if a.version is None else f' v{a.version}'}"
            )
        self._settle(attempts)

    def _plan(self, w: Writer) -> tuple[Writer, str, int | None, OrderStatus | None]:
        """The order, and the version and status a non-reading writer believes."""
        order_id = self.order_ids[w.order % len(self.order_ids)]
        history = self.history[order_id]
        if w.basis == "read":
            return w, order_id, None, None
        if w.basis == "fresh":
            return w, order_id, len(history), history[-1]
        if w.basis == "ahead":
            return w, order_id, len(history) + 1, history[-1]
        expected = len(history) - w.staleness
        return w, order_id, expected, history[expected - 1] if expected >= 1 else S.PENDING

    async def _run_batch(
        self, mode: BatchMode, plans: list[tuple[Writer, str, int | None, OrderStatus | None]]
    ) -> list[Attempt]:
        if mode == "in turn":
            return [await self._attempt(*plan) for plan in plans]
        # Wait for every writer even when one fails, so none outlives its step.
        results = await asyncio.gather(
            *(self._attempt(*plan) for plan in plans), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Attempt)]

    async def _attempt(
        self,
        w: Writer,
        order_id: str,
        expected: int | None,
        believed: OrderStatus | None,
    ) -> Attempt:
        if w.delay_ms:
            await asyncio.sleep(w.delay_ms / 1000)
        if expected is None or believed is None:
            row = await order_store.get_order(self.pool, order_id)
            assert row is not None
            expected, believed = row.version, row.status
        if isinstance(w.target, OrderStatus):
            to = w.target
        else:
            successors = _successors(believed)
            to = successors[w.target % len(successors)] if successors else believed
        attempt = Attempt(w, order_id, expected, believed, to, None, "missed")

        if w.via == "gate":
            tid = f"prop:{uuid.uuid4().hex}"
            req = TransitionInput(
                order_id=order_id,
                expected_version=expected,
                to_status=to,
                transition_id=tid,
                actor="prop:gate",
            )
            attempt = dataclasses.replace(attempt, transition_id=tid)
            try:
                result = await apply_transition(self.pool, req)
            except IllegalTransition:
                return dataclasses.replace(attempt, outcome="refused")
            except VersionConflict as exc:
                stopped = exc.status in (S.CANCELLING, S.CANCELLED)
                assert isinstance(exc, OrderCancelled) == stopped, exc
                return attempt
            assert not result.already_applied, f"a fresh transition id was 'already applied': {req}"
            return dataclasses.replace(attempt, outcome="applied", version=result.version)

        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await gate.describe_writer(conn, gate.Writer("prop:sql"))
                version = await conn.fetchval(
                    "UPDATE orders SET status = $3 WHERE id = $1 AND version = $2 RETURNING version",
                    order_id,
                    expected,
                    to.value,
                )
                if version is not None and w.hold_ms:
                    await asyncio.sleep(w.hold_ms / 1000)  # others queue on the row lock
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != gate.ILLEGAL_TRANSITION_SQLSTATE:
                raise
            return dataclasses.replace(attempt, outcome="refused")
        if version is None:
            return attempt
        return dataclasses.replace(attempt, outcome="applied", version=version)

    async def _replay(self, req: TransitionInput) -> tuple[str, int]:
        try:
            result = await apply_transition(self.pool, req)
        except OrderCancelled as exc:
            return "cancelled", exc.version
        except VersionConflict as exc:
            return "conflict", exc.version
        except IllegalTransition:
            return "refused", -1
        return ("already_applied" if result.already_applied else "applied"), result.version

    async def _create(self, count: int) -> list[str]:
        ids = [f"p-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        async with self.pool.acquire() as conn:
            for order_id in ids:
                order = OrderInput(
                    order_id=order_id,
                    customer_id="gate-properties",
                    items=[{"sku": "WIDGET", "quantity": 1}],
                    amount_cents=100,
                )
                created = await order_store.insert_order(
                    conn, order, workflow_id=f"order-{order_id}", actor="prop:create"
                )
                assert (created.status, created.version) == (S.PENDING, 1)
        return ids

    async def _snapshot(
        self,
    ) -> dict[str, tuple[order_store.OrderRow | None, list[gate.AuditRow[OrderStatus]]]]:
        async def one(
            order_id: str,
        ) -> tuple[order_store.OrderRow | None, list[gate.AuditRow[OrderStatus]]]:
            return await order_store.get_order(
                self.pool, order_id
            ), await order_store.list_transitions(self.pool, order_id)

        rows = await asyncio.gather(*(one(o) for o in self.order_ids))
        return dict(zip(self.order_ids, rows, strict=True))


@pytest.fixture
def writers_loop(database_url: str) -> Iterator[tuple[LoopThread, asyncpg.Pool]]:
    """A loop in a background thread, and an asyncpg pool that lives on it."""
    loop = LoopThread()
    try:
        pool = loop.run(postgres.create_pool(database_url, max_size=8))
        try:
            yield loop, pool
        finally:
            loop.run(pool.close())
    finally:
        loop.close()


# A passing run takes seconds; a failing one needs time to shrink to a minimal program.
@pytest.mark.timeout(300)
def test_concurrent_writers_never_get_past_the_gate(
    writers_loop: tuple[LoopThread, asyncpg.Pool],
) -> None:
    loop, pool = writers_loop
    run_state_machine_as_test(
        # Hypothesis documents "a class or a function" but its annotation says only a class
        lambda: GateMachine(loop, pool),  # type: ignore[arg-type]
        settings=GateMachine.TestCase.settings,
    )
