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

Header lines: under `HEAD_LINES` each request's scope carries its connection, to which the app may hand header lines
it wrote itself (`name: value\r\n`..., checked where they were made) for the head of the response it is about to
send. They are written as they are, after the response's own headers. uvicorn checks each header of a response with
two regular expressions and copies it a few times: the six x-ratelimit-* headers of every answer to a limited key
cost the router more through that loop than the limits themselves (docs/benchmarks.md). Servers without it (Ray
Serve's) leave the key out of the scope, and the app sends such headers as usual.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .disconnect import DISCONNECT_HOOK, DisconnectHook

__all__ = ["HEAD_LINES", "CoalescingHttpToolsProtocol", "HeadLines"]

# The scope key of a request's HeadLines (absent: a server without them).
HEAD_LINES = "svllm.head_lines"


class HeadLines(Protocol):
    def add_head_lines(self, lines: bytes) -> None:
        """Header lines (`name: value\r\n`..., already checked) for the head of the response about to start."""


class _CoalescingTransport:
    """Wraps a transport: writes are queued and sent as one at the end of the loop's turn; the rest is delegated.
    It is also the connection's HeadLines: lines handed to it go into the next write, the response's head."""

    __slots__ = ("_head_lines", "_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False
        self._head_lines = b""

    def add_head_lines(self, lines: bytes) -> None:
        self._head_lines += lines

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._head_lines and data.endswith(b"\r\n\r\n"):  # the head: the lines go before its blank line
            data = b"%s%s\r\n" % (data[:-2], self._head_lines)
            self._head_lines = b""
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
        self.scope[HEAD_LINES] = self.transport  # type: ignore[literal-required]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hook: DisconnectHook | None = cycle.scope.get(DISCONNECT_HOOK)  # type: ignore[assignment]
            if hook is not None:
                hook.fire()
