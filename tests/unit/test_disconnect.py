"""until_disconnect: a client that goes away cancels the work it started; one that stays gets the result. Both
ways of being told: the connection's hook (our server protocol, tested here on a real uvicorn server and socket)
and a task waiting for `http.disconnect` (other servers)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from serverless_vllm.dataplane.disconnect import (
    CLIENT_CLOSED,
    DISCONNECT_HOOK,
    ClientDisconnected,
    DisconnectHook,
    until_disconnect,
)
from starlette.requests import Request
from starlette.types import Message

from .served import served


def request(disconnect_after: float | None, hook: DisconnectHook | None = None) -> Request:
    """A request whose body was read: its receive says nothing until the client goes (or never)."""

    async def receive() -> Message:
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/", "headers": []}
    if hook is not None:
        scope[DISCONNECT_HOOK] = hook
    return Request(scope, receive)


async def long_work(cleaned: asyncio.Event) -> str:
    try:
        await asyncio.sleep(30)  # a cold start, a long generation read whole
        return "done"
    finally:
        cleaned.set()  # what the work held (queue slot, upstream connection) is released


async def test_without_hook_a_client_that_leaves_cancels_the_work_at_once() -> None:
    cleaned = asyncio.Event()
    started = time.monotonic()
    with pytest.raises(ClientDisconnected) as err:
        await until_disconnect(request(0.05), long_work(cleaned))
    assert time.monotonic() - started < 1.0 and cleaned.is_set()
    assert err.value.status == CLIENT_CLOSED


async def test_with_hook_the_connection_cancels_the_work_at_once() -> None:
    hook, cleaned = DisconnectHook(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, hook.fire)
    started = time.monotonic()
    with pytest.raises(ClientDisconnected):
        await until_disconnect(request(None, hook), long_work(cleaned))
    assert time.monotonic() - started < 1.0 and cleaned.is_set() and hook.callback is None


async def test_with_hook_a_client_already_gone_is_not_served() -> None:
    hook = DisconnectHook()
    hook.fire()
    with pytest.raises(ClientDisconnected):
        await until_disconnect(request(None, hook), asyncio.sleep(30))


async def test_a_client_that_stays_gets_the_result_and_nothing_watches_after() -> None:
    async def quick() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    before = len(asyncio.all_tasks())
    assert await until_disconnect(request(None), quick()) == "answer"
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before  # the watcher is gone: a streamed response may listen itself
    hook = DisconnectHook()
    assert await until_disconnect(request(None, hook), quick()) == "answer"
    assert hook.callback is None


async def test_an_outside_cancellation_is_not_taken_for_a_disconnect() -> None:
    for hook in (None, DisconnectHook()):
        task = asyncio.create_task(until_disconnect(request(None, hook), asyncio.sleep(30)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_our_server_protocol_fires_the_hook_when_the_client_leaves() -> None:
    """A real uvicorn server built as the services build theirs, a real socket that sends a request and closes."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        try:
            await until_disconnect(Request(scope, receive), asyncio.sleep(30))
            outcome.set_result("finished")
        except ClientDisconnected:
            outcome.set_result("cancelled by the hook" if scope[DISCONNECT_HOOK].fired else "cancelled")
            raise

    async with served(app) as (server, _):
        sock = socket.create_connection(("127.0.0.1", server.config.port))
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        await asyncio.sleep(0.2)
        sock.close()
        assert await asyncio.wait_for(outcome, 2.0) == "cancelled by the hook"
