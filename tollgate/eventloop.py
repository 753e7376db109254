"""The event loop Tollgate's long-running processes (the worker, the HTTP API) run on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (not on Windows), else on asyncio.

    Much of a worker's CPU goes to the event loop itself (polls, callbacks, futures):
    on uvloop the worker used a fifth less CPU per order (``make bench``, "CPU per
    run"). Workflow code is unaffected: the SDK runs it on a deterministic loop of its
    own. The uvicorn servers of the development stack pick uvloop (and httptools) up by
    themselves.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
