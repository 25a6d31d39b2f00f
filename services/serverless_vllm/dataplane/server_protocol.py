"""The HTTP server protocol of manager, router and worker: uvicorn's httptools protocol, one socket write per burst,
a disconnect hook, a timeout for clients that stall while sending a request, a bound on a request's head, and errors
in the API's shape for requests the parser refuses (uvicorn answers those in plain text).

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

Slow clients: uvicorn waits as long as a client likes for a request's head, and for the rest of a body it has begun, so
a few hundred connections that send a byte now and then (slowloris) hold a file descriptor and a task each for good; and
an answer its client does not read holds its handler (and, through a relay, the engine's request) until the client goes.
With a client timeout (CLIENT_TIMEOUT), a request's head must arrive whole within it (counted from its first byte, or
from the connection's opening for its first request), a body may not go silent for longer while the app waits for it,
and an answer may not wait longer for its client to read it, as nginx's client_header_timeout, client_body_timeout and
send_timeout do. A request cut off so is answered 408 (in the OpenAI shape, Anthropic's on /v1/messages) and its
connection closed; a connection that never sent a byte is closed without an answer (browsers open spare ones); an unread
answer's connection is aborted (the app's stream learns its client left). Idle time between requests stays uvicorn's
keep-alive timeout's. Each connection checks itself four times per timeout on one timer (none per request): a stall is
ended between one and 1.25 timeouts after it began, and the request path pays nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import struct
import termios
from typing import Any, Protocol, cast

from uvicorn import config as uvicorn_config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import CliSettings
from ..errors import APIError
from .disconnect import DISCONNECT_HOOK, DisconnectHook

__all__ = ["HEAD_LINES", "MAX_HEAD_BYTES", "CoalescingHttpToolsProtocol", "HeadLines"]

# The scope key of a request's HeadLines (absent: a server without them).
HEAD_LINES = "svllm.head_lines"

# The largest request head (request line and headers) a client may send, as Go's net/http allows by default. The
# parser keeps a header it has not seen the end of by joining its pieces, in time that grows with the square of its
# size: a 32 MB header took 1.4 s of CPU here (8 MB: 0.1 s), so a few hundred megabytes from one client, minutes.
MAX_HEAD_BYTES = 1 << 20


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
    """Pass as `uvicorn.Config(http=...)`; `with_client_timeout(seconds)` for the timeout of slow clients."""

    client_timeout_s: float | None = None  # None: clients may take as long as they like (uvicorn's behaviour)

    @classmethod
    def with_client_timeout(cls, seconds: float | None) -> type[CoalescingHttpToolsProtocol]:
        """This protocol with a timeout for slow clients (None or 0: none)."""
        if not seconds:
            return cls
        return type(cls.__name__, (cls,), {"client_timeout_s": seconds})

    @classmethod
    def configured(cls) -> type[CoalescingHttpToolsProtocol]:
        """The protocol the services serve with: CLIENT_TIMEOUT read from the environment now (not at import)."""
        return cls.with_client_timeout(CliSettings.from_env().client_timeout_s)

    @classmethod
    def as_uvicorn_default(cls, client_timeout_s: float | None) -> None:
        """Make every uvicorn server this process builds from now on that names no protocol speak this one, for an
        app on another thread's loop. For a server whose Config is not ours: Ray Serve's direct ingress builds one in
        each router replica's process and names none (ray_mode/serve_app.py). uvicorn resolves its default, "auto",
        through this table at the server's start, and takes a class where it finds one."""
        protocol = ForAppOnAnotherLoop.with_client_timeout(client_timeout_s)
        uvicorn_config.HTTP_PROTOCOLS["auto"] = protocol  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _CoalescingTransport(transport, self.loop)))
        self._head_bytes = 0  # bytes of the head being read (a bound: MAX_HEAD_BYTES)
        self._head_of: object = None  # the request cycle they were counted after
        self._resumed = 0  # times the send buffer drained below its low mark (the client reads)
        self._watch: _ClientWatch | None = None
        if self.client_timeout_s is not None:
            self._watch = _ClientWatch(self, self.client_timeout_s)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or not cycle.more_body:  # not within a body: a head, or the start of one
            if cycle is not self._head_of:  # a head was parsed since: the next one is counted from here
                self._head_of, self._head_bytes = cycle, 0
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                error = APIError(431, f"request head larger than {MAX_HEAD_BYTES} bytes", "head_too_large")
                self.answer_and_close(error, "Request Header Fields Too Large")
                return
        super().data_received(data)

    def resume_writing(self) -> None:  # only under backpressure: not on the request path
        self._resumed += 1
        super().resume_writing()

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused (a malformed head, say a Content-Length that is not a number): uvicorn
        answers it in plain text; here in the API's shape, like any other bad input. Then the connection closes."""
        error = APIError(400, f"{msg.rstrip('.')}: the request is not valid HTTP/1.1", "invalid_http_request")
        self.answer_and_close(error, "Bad Request")

    def answer_and_close(self, error: APIError, reason: str) -> None:
        """Answer a request the app never saw with `error`, in the shape of its path's clients (the path as far as
        it has arrived), and close the connection."""
        scope = self.scope
        path = (scope.get("path") or self.url.decode("latin-1")) if scope is not None else ""
        body = json.dumps(error.body_for(path)).encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
        self.transport.write(head % (error.status, reason.encode(), len(body)) + body)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[DISCONNECT_HOOK] = DisconnectHook()  # type: ignore[literal-required]
        self.scope[HEAD_LINES] = self.transport  # type: ignore[literal-required]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if self._watch is not None:
            self._watch.stop()
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hook: DisconnectHook | None = cycle.scope.get(DISCONNECT_HOOK)  # type: ignore[assignment]
            if hook is not None:
                hook.fire()


class ForAppOnAnotherLoop(CoalescingHttpToolsProtocol):
    """For an app run on another thread's event loop (Ray Serve's replicas run theirs so): its scope carries neither
    the disconnect hook, which would cancel a task of that loop from this one, nor header lines. The app watches
    `receive` for the disconnect, and adds headers, as it does under any other server."""

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel has not yet sent on the connection's socket (Linux's SIOCOUTQ; 0 where it cannot say)."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, AttributeError):
        return 0


class _ClientWatch:
    """One connection's check for a client that stalls (the module's docstring): a timer every quarter timeout."""

    __slots__ = (
        "_body_seen",
        "_buffered",
        "_conn",
        "_head_s",
        "_interval",
        "_quiet_s",
        "_timeout",
        "_timer",
        "_unread_s",
    )

    def __init__(self, conn: CoalescingHttpToolsProtocol, timeout_s: float) -> None:
        self._conn = conn
        self._timeout = timeout_s
        self._interval = timeout_s / 4
        self._head_s = 0.0  # how long the head being received (or awaited) has taken so far
        self._quiet_s = 0.0  # how long a body the app waits for has been silent
        self._body_seen: bytearray | None = None  # the request's body buffer at the last check (kept alive)
        self._unread_s = 0.0  # how long the answer has waited for the client to read it, its buffer full
        self._buffered: tuple[int, int, int] | None = None  # (ours unsent, the kernel's, drains) at the last check
        self._timer: asyncio.TimerHandle | None = conn.loop.call_later(self._interval, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        conn = self._conn
        self._timer = None
        if conn.transport.is_closing():
            return
        cycle = conn.cycle
        if cycle is not None and not cycle.response_complete:  # a request being answered: is its body awaited?
            self._head_s = 0.0
            # Nothing came since the last check: uvicorn's receive hands the app what arrived and starts a new
            # buffer, so the same empty buffer means no byte (counting reads would cost every request a frame).
            quiet = cycle.body is self._body_seen
            self._body_seen = cycle.body
            awaited = cycle.scope is conn.scope and cycle.more_body and not cycle.body
            awaited = awaited and not cycle.waiting_for_100_continue  # the client waits for the app's go
            self._quiet_s = self._quiet_s + self._interval if awaited and quiet else 0.0
            # An answer the client does not read: its send buffer full (the app waits to write more), and since
            # the last check nothing drained, neither our buffer nor the kernel's (which holds megabytes, and lets
            # ours move only once a third of it is free: a slow reader would look stuck for long by ours alone).
            if cycle.response_started and conn.flow.write_paused:
                now = (conn.transport.get_write_buffer_size(), _unsent(conn.transport), conn._resumed)
                was = self._buffered
                unread = was is not None and now[2] == was[2] and now[0] >= was[0] and now[1] >= was[1]
                self._unread_s, self._buffered = self._unread_s + self._interval if unread else 0.0, now
            else:
                self._unread_s, self._buffered = 0.0, None
        else:
            self._body_seen = None
            self._unread_s, self._buffered = 0.0, None
            # A head on its way (or none yet). Between requests uvicorn's keep-alive timer runs instead, until
            # a byte of the next request stops it.
            self._quiet_s = 0.0
            self._head_s = self._head_s + self._interval if conn.timeout_keep_alive_task is None else 0.0
        if self._unread_s >= self._timeout:
            # Aborted: a close would first wait for the buffer to go out. The app's stream learns its client left,
            # and a relay closes its upstream (the engine aborts the generation).
            conn.transport.abort()
        elif self._head_s >= self._timeout or self._quiet_s >= self._timeout:
            self._time_out()
        else:
            self._timer = conn.loop.call_later(self._interval, self._check)

    def _time_out(self) -> None:
        conn = self._conn
        cycle = conn.cycle
        head_begun = conn.scope is not None and (cycle is None or cycle.scope is not conn.scope)
        body_begun = cycle is not None and cycle.scope is conn.scope and not cycle.response_started
        if not (head_begun or body_begun):  # a connection that never began a request is not answered
            conn.transport.close()
            return
        timeout = f"{self._timeout:g} s"
        message = f"request timed out: its head took more than {timeout} to arrive, or its body paused that long"
        # Closed after the answer: the app waiting for the body is told its client is gone.
        conn.answer_and_close(APIError(408, message, "request_timeout"), "Request Timeout")
