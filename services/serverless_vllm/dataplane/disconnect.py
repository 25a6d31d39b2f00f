"""A client that goes away cancels the work it started, on every path.

uvicorn does not cancel a handler whose client disconnected; a streamed response notices (Starlette listens for
`http.disconnect` while it streams), but everything before the first byte does not: a request held through a cold
start, one waiting to connect, and a non-streamed response being read whole, which would keep an engine generating
to the end for nobody. So once a request's body is read (its `receive` then only ever says `http.disconnect`),
`until_disconnect` watches for that message and cancels the handler where it waits. The cancelled await closes
what it held: the hold's queue slot is given back, the upstream connection is closed (not pooled), and the next hop
sees its own client go away, down to vLLM, which aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from ..errors import APIError

T = TypeVar("T")

# nginx's status for a request whose client closed the connection: what the request metrics count it as.
CLIENT_CLOSED = 499


class ClientDisconnected(APIError):
    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "the client closed the connection", "client_closed_request")


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise ClientDisconnected.

    Only after the request body was read: `receive` must have nothing left to give but the disconnect. The watcher
    is stopped before returning, so a streamed response can listen for the disconnect itself."""
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
