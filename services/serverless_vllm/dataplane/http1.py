"""A small pooled HTTP/1.1 client for the inference relay (router -> worker -> engine).

The relay's peers are known HTTP/1.1 servers (our worker, vLLM's uvicorn) and its requests are all alike: a POST
with a JSON body, answered by JSON or by an event stream. For that, a general client costs far more than the
bytes it moves: aiohttp took about 0.1 ms of CPU per request here, this client about 0.02 ms
(bench/relay_client.py, docs/benchmarks.md).
Responses are parsed by httptools (the parser uvicorn itself uses), one request per connection at a time, and
idle connections are kept per host for reuse.

Failures are UpstreamError. `refused` marks a connection that could not be made at all (the host or its server
is gone), which the router reports to the manager.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

# Reading pauses while this much of a response waits for a slow client, and resumes below a quarter of it.
_HIGH_WATER = 256 * 1024
# An idle connection is dropped before the server's keep-alive timeout would close it under a request being sent:
# vLLM's engines close one idle 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, uvicorn's default); our services keep theirs 75 s.
_IDLE_S = 4.0
_MAX_IDLE_PER_HOST = 256


class UpstreamError(Exception):
    """Nothing usable came back: the upstream refused, vanished, timed out or sent garbage."""

    def __init__(self, message: str, refused: bool = False, nothing_received: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.nothing_received = nothing_received  # closed before a single byte of the response came


class _Origin:
    """Where a base URL's requests go, parsed once."""

    __slots__ = ("host", "host_header", "path_prefix", "port", "ssl")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"not an http(s) URL: {base_url!r}")
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.host_header = parts.netloc.encode("idna")
        self.path_prefix = parts.path.rstrip("/")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time (no pipelining)."""

    def __init__(self, read_timeout_s: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._response: UpstreamResponse | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._received = False  # any byte of the current response

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self._received = True
        if self._response is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._stop_timer()
        if self._response is not None and not self._response.complete:
            self._fail(
                UpstreamError("connection closed before the response ended", nothing_received=not self._received)
            )

    # -------------------------------------------------------------- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        self._response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._response is not None
        self._response._headers_done(self._parser.get_status_code(), self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._feed(body)

    def on_message_complete(self) -> None:
        self._stop_timer()
        assert self._response is not None
        self._response._end()

    # -------------------------------------------------------------- used by Client and UpstreamResponse

    def send(self, request: bytes, response: UpstreamResponse) -> None:
        assert self.transport is not None
        self._response = response
        self._parser = httptools.HttpResponseParser(self)
        self._last_read = self._loop.time()
        self._received = False
        if self._read_timeout_s is not None:
            self._timer = self._loop.call_later(self._read_timeout_s, self._check_timeout)
        self.transport.write(request)

    def detach(self) -> None:
        self._response = None
        self._stop_timer()

    def abort(self) -> None:
        """Close now; for an engine this aborts the request it was generating."""
        self.lost = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _check_timeout(self) -> None:
        # One timer per request, moved on only when it fires: cheaper than re-arming it on every read.
        assert self._read_timeout_s is not None
        idle = self._loop.time() - self._last_read
        if idle >= self._read_timeout_s:
            self._timer = None
            self._fail(UpstreamError(f"no data for {self._read_timeout_s:.0f} s"))
        else:
            self._timer = self._loop.call_later(self._read_timeout_s - idle, self._check_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: UpstreamError) -> None:
        response = self._response
        self.abort()
        if response is not None:
            response._fail(exc)


class UpstreamResponse:
    """An upstream response: status and headers first, then the body as it arrives. `close()` when done."""

    def __init__(self, connection: _Connection, pool: Client, origin: _Origin) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-cased names
        self.complete = False
        self._connection = connection
        self._pool = pool
        self._origin = origin
        self._keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; what arrived together comes as one chunk. Raises UpstreamError if cut."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._connection.transport is not None and not self._connection.lost:
                    self._connection.transport.resume_reading()
                yield data
            elif self._error is not None:
                raise self._error
            elif self.complete:
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """Done with it: a connection whose response ended goes back to the pool; any other is closed (vLLM
        then aborts the request)."""
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        connection.detach()
        if self.complete and self._keep_alive and not connection.lost:
            self._pool._release(self._origin, connection)
        else:
            connection.abort()

    # -------------------------------------------------------------- fed by the connection

    def _headers_done(self, status: int, keep_alive: bool) -> None:
        self.status, self._keep_alive = status, keep_alive
        if not self._head.done():
            self._head.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and self._connection.transport is not None:
            self._connection.transport.pause_reading()  # the client reads slowly: let TCP push back upstream
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        self._error = exc
        if not self._head.done():
            self._head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Client:
    """Pooled connections per origin. `read_timeout_s`: the longest silence allowed while a response is awaited
    or read (None: no limit); `connect_timeout_s` bounds connecting, so a dead host fails fast."""

    def __init__(self, read_timeout_s: float | None = None, connect_timeout_s: float = 5.0) -> None:
        self._read_timeout_s = read_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST `body` to `base_url + path`; returns once the status and headers are in."""
        return await self.request("POST", base_url, path, body, headers)

    async def request(
        self, method: str, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> UpstreamResponse:
        """Send one request; returns once the status and headers are in."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = _Origin(base_url)
        head = [
            f"{method} {origin.path_prefix}{path} HTTP/1.1\r\n".encode("latin-1"),
            b"host: ",
            origin.host_header,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"\r\n")
        request = b"".join(head) + body
        reused = self._take_idle(origin)
        if reused is not None:
            try:
                return await self._exchange(reused, origin, request)
            except UpstreamError as exc:
                # A kept-alive connection the server closed just as it was reused (its keep-alive timeout, a
                # restart) without a byte of answer: the request most likely never got there (and a completion
                # asked for twice has no side effect), so it goes again on a new connection, once.
                if not exc.nothing_received:
                    raise
        return await self._exchange(await self._connect(origin), origin, request)

    async def _exchange(self, connection: _Connection, origin: _Origin, request: bytes) -> UpstreamResponse:
        response = UpstreamResponse(connection, self, origin)
        connection.send(request, response)
        try:
            await response._head
        except BaseException:
            response.close()
            raise
        return response

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get((origin.host, origin.port, origin.ssl))
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.lost and now - connection.idle_since < _IDLE_S:
                return connection
            connection.abort()
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.ssl:
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._read_timeout_s),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context else None,
                )
        except TimeoutError:
            raise UpstreamError(f"connecting to {origin.host}:{origin.port} timed out", refused=True) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {origin.host}:{origin.port}: {exc}", refused=True) from None
        return connection

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault((origin.host, origin.port, origin.ssl), [])
        if len(idle) >= _MAX_IDLE_PER_HOST:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.abort()
        self._idle.clear()
