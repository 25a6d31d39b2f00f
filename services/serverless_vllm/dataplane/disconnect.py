"""A client that goes away cancels the work it started, on every path.

uvicorn does not cancel a handler whose client disconnected; a streamed response notices (Starlette listens for
`http.disconnect` while it streams), but everything before the first byte does not: a request held through a cold
start, one waiting to connect, and a non-streamed response being read whole, which would keep an engine generating
to the end for nobody. So once a request's body is read, `until_disconnect` cancels the handler where it waits if
the client goes. The connection itself says so where our server protocol runs (dataplane/server_protocol.py puts a
`DisconnectHook` in each scope: a small object per request, no task); elsewhere (Ray Serve's own server) a task
waits for `http.disconnect`, which is all the request's `receive` has left to say. The cancelled await closes what
it held: the hold's queue slot is given back, the upstream connection is closed (not pooled), and the next hop
sees its own client go away, down to vLLM, which aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from ..errors import APIError

T = TypeVar("T")

# nginx's status for a request whose client closed the connection: what the request metrics count it as.
CLIENT_CLOSED = 499


# The scope key of a request's DisconnectHook.
DISCONNECT_HOOK = "svllm.disconnect"


class ClientDisconnected(APIError):
    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "the client closed the connection", "client_closed_request")


class DisconnectHook:
    """Fired by the connection when it is lost before the response is complete."""

    __slots__ = ("callback", "fired")

    def __init__(self) -> None:
        self.callback: Callable[[], Any] | None = None
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        if self.callback is not None:
            self.callback()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise ClientDisconnected.

    Only after the request body was read. Nothing watches once it returns, so a streamed response can listen for
    the disconnect itself."""
    hook: DisconnectHook | None = request.scope.get(DISCONNECT_HOOK)
    if hook is None:
        return await _watching(request.receive, work)
    if hook.fired:
        _close(work)
        raise ClientDisconnected()
    handler = asyncio.current_task()
    assert handler is not None
    hook.callback = handler.cancel
    try:
        return await work
    except asyncio.CancelledError:
        if hook.fired:
            handler.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        hook.callback = None


def _close(work: Awaitable[Any]) -> None:
    close = getattr(work, "close", None)  # a coroutine never awaited: closed, so no warning is printed
    if close is not None:
        close()


async def _watching(receive: Receive, work: Awaitable[T]) -> T:
    """The same with a task that waits for `http.disconnect` (servers without the hook)."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            handler.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()
