"""Small asyncio helpers shared by the components."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; True if it was set.

    Uses asyncio.timeout rather than wait_for(event.wait()), whose inner task can leave a cancelled
    caller waiting forever on Python 3.11.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` and wait for them to end. A task's own cancellation is expected and not raised; an error it
    ended with is. Unlike `suppress(CancelledError)` around `await task`, a cancellation of the caller while it
    waits here is not swallowed: the caller is cancelled as asked."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    if not running:
        return
    await asyncio.wait(running)
    for task in running:
        if not task.cancelled():
            task.result()  # its error, if it ended with one before it could be cancelled
