"""Waiting for a lifecycle to get somewhere, by deadline rather than by a count of polls.

These machines are shared: a step that takes 50 ms alone can take seconds while other
tests (or other machines) hold the CPU. A test waits for what it needs with a generous
deadline and fails with what it was waiting for, never on how many polls it made.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from tollgate.errors import OrderNotFound
from tollgate.names import ORDER_STATUS_QUERY
from tollgate.orders.models import OrderProgress
from tollgate.orders.service import OrderService
from tollgate.orders.states import OrderStatus

T = TypeVar("T")

#: Long enough for a loaded 2-core machine; a test that needs this long is still failing.
WITHIN = 30.0


@overload
async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    within: float = ...,
    every: float = ...,
    what: str = ...,
) -> T: ...
@overload
async def eventually(
    probe: Callable[[], T | None], *, within: float = ..., every: float = ..., what: str = ...
) -> T: ...
async def eventually(
    probe: Callable[[], Any],
    *,
    within: float = WITHIN,
    every: float = 0.02,
    what: str = "the condition held",
) -> Any:
    """Call ``probe`` (sync or async) until it returns something truthy, and return that.

    Fails with ``AssertionError`` naming ``what`` and the last value after ``within`` s.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {within:.0f} s; last: {value!r}")
        await asyncio.sleep(every)


async def order_step(service: OrderService, order_id: str, step: str) -> None:
    """Wait until the order's workflow says it is at ``step`` (its progress query) and,
    for a forward step, until the row is there too: the step's activity moves the row
    first, a moment after the workflow sent it."""

    async def at_step() -> bool:
        progress: OrderProgress = await service.handle(order_id).query(
            ORDER_STATUS_QUERY, result_type=OrderProgress
        )
        return progress.step == step

    await eventually(at_step, what=f"order {order_id} at step {step}")
    if step in _MOVED_BY_STEP:
        await order_status(service, order_id, _MOVED_BY_STEP[step], every=0.005)


#: The forward steps, and where each one's activity moves the row before its call.
_MOVED_BY_STEP = {
    "validating": OrderStatus.VALIDATING,
    "charging": OrderStatus.CHARGING,
    "reserving": OrderStatus.RESERVING,
}


async def order_status(
    service: OrderService, order_id: str, status: OrderStatus, *, every: float = 0.02
) -> None:
    """Wait until the order's row (Postgres, the authority) is at ``status``; the row
    may not be written yet when the wait begins."""

    async def at_status() -> bool:
        try:
            return (await service.row(order_id)).status == status
        except OrderNotFound:
            return False

    await eventually(at_status, every=every, what=f"order {order_id} {status.value}")
