"""Whether a stack is already serving: ``make demo`` and ``make bench`` reuse one that is."""

from __future__ import annotations

import asyncio

from tollgate.settings import Settings
from tollgate.temporal import connect
from tollgate_dev.sandbox import SandboxAdmin


async def stack_is_up(settings: Settings) -> bool:
    """Whether the settings' sandbox answers and their Temporal accepts a connection
    (``make up`` running, or your own servers)."""
    try:
        async with SandboxAdmin(settings.sandbox_url, timeout=1.0) as sandbox:
            await sandbox.health()
        await asyncio.wait_for(connect(settings), timeout=3.0)
    except Exception:
        return False
    return True
