"""One ``async with`` frame for the development tools' stacks, clients and players.

They all hold something that must be given back (processes, a connection pool, a
watching task): ``async with`` starts it and gives it back however the body ends.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["StartStop"]


class StartStop:
    """Base for an object used as ``async with``: entering awaits :meth:`start`, leaving
    awaits :meth:`stop`, whether the body raised or not (its exception still propagates).
    """

    async def start(self) -> None:
        """Nothing to start by default: the object is ready once constructed."""

    async def stop(self) -> None:
        """Give back what :meth:`start` or the constructor took."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
