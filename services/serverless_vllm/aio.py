"""Small asyncio helpers shared by the components."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; True if it was set.

    Uses asyncio.timeout rather than wait_for(event.wait()), whose inner task can leave a cancelled
    caller waiting forever on Python 3.11.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
