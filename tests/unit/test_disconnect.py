"""until_disconnect: a client that goes away cancels the work it started; one that stays gets the result."""

from __future__ import annotations

import asyncio
import time

import pytest
from serverless_vllm.dataplane.disconnect import CLIENT_CLOSED, ClientDisconnected, until_disconnect
from starlette.types import Message


def client(disconnect_after: float | None) -> tuple[asyncio.Event, object]:
    """An ASGI receive after the body was read: nothing until the client goes (or forever)."""
    asked = asyncio.Event()

    async def receive() -> Message:
        asked.set()
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    return asked, receive


async def test_a_client_that_leaves_cancels_the_work_at_once() -> None:
    _, receive = client(0.05)
    cleaned = asyncio.Event()

    async def long_work() -> str:
        try:
            await asyncio.sleep(30)  # a cold start, a long generation read whole
            return "done"
        finally:
            cleaned.set()  # what the work held (queue slot, upstream connection) is released

    started = time.monotonic()
    with pytest.raises(ClientDisconnected) as err:
        await until_disconnect(receive, long_work())  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0 and cleaned.is_set()
    assert err.value.status == CLIENT_CLOSED


async def test_a_client_that_stays_gets_the_result_and_the_watcher_stops() -> None:
    asked, receive = client(None)

    async def quick() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    before = len(asyncio.all_tasks())
    assert await until_disconnect(receive, quick()) == "answer"  # type: ignore[arg-type]
    assert asked.is_set()  # it was watching
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before  # and no longer is: a streamed response may listen itself


async def test_an_outside_cancellation_is_not_taken_for_a_disconnect() -> None:
    _, receive = client(None)
    task = asyncio.create_task(until_disconnect(receive, asyncio.sleep(30)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
