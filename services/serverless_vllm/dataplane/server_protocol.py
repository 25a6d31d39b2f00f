"""The HTTP server protocol of manager, router and worker: uvicorn's httptools protocol, one socket write per burst,
and a disconnect hook.

uvicorn writes a response's head and its body with two transport writes. On an idle socket each is its own
send() (two TCP segments, and the peer wakes and reads twice): on the relay, where a response is small and
every request crosses two of our servers, those writes were the largest single cost in the router's and the
worker's profiles (docs/benchmarks.md). Here the writes a response makes within one turn of the event loop
are joined and sent at the end of that turn. A streamed event still leaves in the turn it was written in, so
no delay is added that a client could see.

The hook: each request's scope carries a `DisconnectHook` that the connection fires when it is lost before the
response is complete, so a handler can be cancelled at once (dataplane/disconnect.py) without a task per request
listening for `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .disconnect import DISCONNECT_HOOK, DisconnectHook

__all__ = ["CoalescingHttpToolsProtocol"]


class _CoalescingTransport:
    """Wraps a transport: writes are queued and sent as one at the end of the loop's turn; the rest is delegated."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written before close() still goes out, as with a plain transport
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, resume_reading, abort, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """Pass as `uvicorn.Config(http=...)`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _CoalescingTransport(transport, self.loop)))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[DISCONNECT_HOOK] = DisconnectHook()  # type: ignore[literal-required]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hook: DisconnectHook | None = cycle.scope.get(DISCONNECT_HOOK)  # type: ignore[assignment]
            if hook is not None:
                hook.fire()
