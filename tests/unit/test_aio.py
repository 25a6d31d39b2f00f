"""`stop_tasks`: how every background loop of the components is stopped (router syncs, usage reports, the fair
queue, the manager's loop, the worker's heartbeat, prefetch and the fork server)."""

from __future__ import annotations

import asyncio

import pytest
from serverless_vllm.aio import stop_tasks


async def test_stops_running_tasks_and_ignores_none() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    tasks = [asyncio.create_task(forever()) for _ in range(2)]
    await started.wait()
    await stop_tasks(tasks[0], None, tasks[1])
    assert all(t.cancelled() for t in tasks)
    await stop_tasks()  # nothing to stop


async def test_an_error_the_task_ended_with_is_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("the loop died")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="the loop died"):
        await stop_tasks(task)


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    """A task that takes a while to end after its cancel (it cleans up), and its stopper is itself cancelled
    meanwhile (a shutdown given up): the stopper must end cancelled, not return as if it had stopped the task."""
    cleaning = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaning.set()
            await asyncio.shield(asyncio.sleep(3600))  # a cleanup that does not end soon

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_tasks(task))
    await cleaning.wait()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert stopper.cancelled()
    task.cancel()
