"""The services' HTTP server protocol (server_protocol.py) in a real uvicorn server on loopback, built by the same
`cli._server` the services use, with a real client. What reaches the socket is recorded under the coalescing
layer, so the test sees the writes the kernel gets."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from serverless_vllm.dataplane.disconnect import DISCONNECT_HOOK
from serverless_vllm.dataplane.server_protocol import HEAD_LINES, MAX_HEAD_BYTES, CoalescingHttpToolsProtocol
from uvicorn import config as uvicorn_config

from .served import served

EVENT_GAP_S = 0.05
CLIENT_TIMEOUT_S = 1.0  # the slow-client tests' CLIENT_TIMEOUT


class _RecordingTransport:
    """Under the coalescing layer: records each write the socket gets, then makes it."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/lines":  # header lines the app wrote itself, handed to the server for the head
        scope[HEAD_LINES].add_head_lines(b"x-ratelimit-limit-requests: 10\r\n")
        scope[HEAD_LINES].add_head_lines(b"x-ratelimit-remaining-requests: 9\r\n")
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(4):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            await asyncio.sleep(EVENT_GAP_S)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok": true}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, list[bytes]]]:
    writes: list[bytes] = []
    real_connection_made = CoalescingHttpToolsProtocol.connection_made

    def connection_made(self: CoalescingHttpToolsProtocol, transport: asyncio.Transport) -> None:
        real_connection_made(self, _RecordingTransport(transport, writes))  # type: ignore[arg-type]

    monkeypatch.setattr(CoalescingHttpToolsProtocol, "connection_made", connection_made)
    async with served(app) as (server, url):
        assert issubclass(server.config.http, CoalescingHttpToolsProtocol)  # what the services run
        assert server.config.http.client_timeout_s == 60.0  # CLIENT_TIMEOUT's default
        yield url, writes


async def test_a_response_is_one_socket_write(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(monkeypatch) as (url, writes), httpx.AsyncClient() as client:
        for _ in range(3):  # kept alive: one write per response, each the whole response
            resp = await client.post(f"{url}/json", content=b"{}")
            assert resp.status_code == 200 and resp.json() == {"ok": True}
        assert len(writes) == 3, writes
        assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b'{"ok": true}') for w in writes), writes


async def test_a_response_before_close_still_goes_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # `Connection: close`: uvicorn closes the transport right after the body; the queued bytes go first.
    async with serving(monkeypatch) as (url, writes), httpx.AsyncClient() as client:
        resp = await client.post(f"{url}/json", content=b"{}", headers={"connection": "close"})
        assert resp.status_code == 200 and resp.json() == {"ok": True}
        assert len(writes) == 1 and b"connection: close" in writes[0].lower()


async def test_streamed_events_are_not_held_back(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(monkeypatch) as (url, writes), httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/stream", content=b"{}") as resp:
            lines = [line async for line in resp.aiter_lines() if line]
        assert lines == [f"data: {i}" for i in range(4)]
        # Each event went to the socket in the turn it was written in, on its own: nothing waits for the next
        # event or for the end. (The head shares the first event's write: both are written in the same turn.)
        assert len(writes) == 5, writes  # head + event 0, events 1-3, the end of the chunked body
        assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"data: 0\n\n\r\n")
        assert [w.split(b"\r\n")[1] for w in writes[1:4]] == [b"data: %d\n\n" % i for i in (1, 2, 3)]
        assert writes[4] == b"0\r\n\r\n"


async def test_header_lines_handed_to_the_server_are_in_that_response_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(monkeypatch) as (url, writes), httpx.AsyncClient() as client:
        resp = await client.post(f"{url}/lines", content=b"{}")
        assert resp.status_code == 200 and resp.json() == {"ok": True}  # the body and its length are untouched
        assert resp.headers["x-ratelimit-limit-requests"] == "10"
        assert resp.headers["x-ratelimit-remaining-requests"] == "9"
        assert resp.headers["content-type"] == "application/json"  # the response's own headers, before them
        head = writes[0].split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[-2:] == [b"x-ratelimit-limit-requests: 10", b"x-ratelimit-remaining-requests: 9"]
        again = await client.post(f"{url}/json", content=b"{}")  # the same connection, kept alive: none
        assert again.json() == {"ok": True} and "x-ratelimit-limit-requests" not in again.headers
        assert len(writes) == 2


# ---------------------------------------------------------------- slow clients (CLIENT_TIMEOUT)


class Echo:
    """An app that reads the whole body (what its receive calls returned are kept) and answers its length, after
    `delay_s`: a slow answer, for which the client rightly sends nothing."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.received: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            message = await receive()
            self.received.append(message["type"])
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await asyncio.sleep(self.delay_s)
        body = b'{"size": %d}' % size
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def timed_server(monkeypatch: pytest.MonkeyPatch, app: Any) -> AsyncIterator[int]:
    """`app` served as the services serve theirs (cli._server), with CLIENT_TIMEOUT set short."""
    monkeypatch.setenv("CLIENT_TIMEOUT", str(CLIENT_TIMEOUT_S))
    async with served(app) as (server, _):
        yield server.config.port


async def read_all(reader: asyncio.StreamReader, limit_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (a test that waits longer has failed)."""
    return await asyncio.wait_for(reader.read(), limit_s)


def timeout_answer(raw: bytes) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), raw
    assert b"connection: close" in head.lower(), raw
    return json.loads(body)


async def trickle_head(writer: asyncio.StreamWriter) -> None:
    """A head's first lines, then a header line each 0.15 timeouts, until 0.9 timeouts (slowloris)."""
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    for i in range(6):
        await asyncio.sleep(CLIENT_TIMEOUT_S * 0.15)
        writer.write(b"x-slow-%d: y\r\n" % i)


def within_the_timeout(elapsed: float) -> bool:
    """A stall is ended between one and 1.25 timeouts after it began (the check runs each quarter timeout); the
    slack above is for a loaded machine."""
    return CLIENT_TIMEOUT_S * 0.9 <= elapsed <= CLIENT_TIMEOUT_S * 1.25 + 0.5


async def test_a_head_trickled_line_by_line_is_cut_off_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slowloris: a header line now and then keeps a connection open for good where only pauses are limited. The
    lines here come until 0.9 timeouts: a limit on pauses would end it at 1.9 timeouts at the earliest, the limit
    on the whole head at 1 to 1.25. (They stop before it: a line sent after the server closed would be answered
    with a reset, which can take the 408 with it.)"""
    echo = Echo()
    async with timed_server(monkeypatch, echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        await trickle_head(writer)
        raw = await read_all(reader)
        elapsed = time.monotonic() - started
        writer.close()
        answer = timeout_answer(raw)
        assert answer["error"]["code"] == "request_timeout" and answer["error"]["type"] == "invalid_request_error"
        assert within_the_timeout(elapsed), elapsed
        assert echo.received == []  # the app never saw it


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/messages"])
async def test_a_body_that_pauses_is_answered_408_and_the_app_told_its_client_left(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    echo = Echo()
    async with timed_server(monkeypatch, echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n%s" % (path.encode(), b"{" * 10))
        paused = time.monotonic()
        raw = await read_all(reader)
        elapsed = time.monotonic() - paused
        writer.close()
        answer = timeout_answer(raw)
        if path == "/v1/messages":  # Anthropic's clients read their own shape
            assert answer == {"type": "error", "error": {"type": "invalid_request_error", "message": ANY}}, answer
        else:
            assert answer["error"]["code"] == "request_timeout", answer
        assert within_the_timeout(elapsed), elapsed
        await asyncio.sleep(0.1)
        assert echo.received[-1] == "http.disconnect", echo.received  # the waiting app learns it at once


async def test_a_connection_that_never_sends_a_byte_is_closed_without_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with timed_server(monkeypatch, Echo()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened = time.monotonic()
        assert await read_all(reader) == b""
        assert within_the_timeout(time.monotonic() - opened)
        writer.close()


async def test_a_slow_but_steady_body_and_a_slow_answer_are_not_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body's limit is on its pauses, not its whole time; a client waiting for a slow answer sends nothing
    and is right to; between requests uvicorn's keep-alive timeout (5 s) applies, not ours."""
    echo = Echo(delay_s=CLIENT_TIMEOUT_S * 1.5)
    async with timed_server(monkeypatch, echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n")
        for _ in range(4):  # 4 pauses of half the timeout: two timeouts in all
            await asyncio.sleep(CLIENT_TIMEOUT_S / 2)
            writer.write(b"x")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT_S * 4)
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        assert await reader.readexactly(11) == b'{"size": 4}'
        await asyncio.sleep(CLIENT_TIMEOUT_S * 1.5)  # idle on a kept-alive connection, then the next request
        echo.delay_s = 0.0
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        writer.close()


def test_no_client_timeout_is_uvicorns_protocol_as_it_was() -> None:
    assert CoalescingHttpToolsProtocol.with_client_timeout(0) is CoalescingHttpToolsProtocol
    assert CoalescingHttpToolsProtocol.with_client_timeout(None) is CoalescingHttpToolsProtocol
    assert CoalescingHttpToolsProtocol.with_client_timeout(5).client_timeout_s == 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/messages"])
async def test_a_request_that_is_not_valid_http_is_answered_in_the_apis_shape(path: str) -> None:
    """What the parser refuses (here a Content-Length that is not a number) never reaches the app: the protocol
    answers it 400, as JSON in the shape the path's clients read (uvicorn's own answer is plain text)."""
    echo = Echo()
    async with served(echo) as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
        writer.write(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n{}" % path.encode())
        raw = await read_all(reader)
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 400 bad request" and b"content-type: application/json" in lines, raw
    assert b"connection: close" in lines and b"content-length: %d" % len(body) in lines, raw
    answer = json.loads(body)
    if path == "/v1/messages":
        assert answer == {"type": "error", "error": {"type": "invalid_request_error", "message": ANY}}, answer
    else:
        assert answer["error"]["code"] == "invalid_http_request" and answer["error"]["type"] == "invalid_request_error"
    assert "not valid HTTP/1.1" in str(answer) and echo.received == []


async def answer_of(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One whole answer with a Content-Length: (its head, its body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length: "))
    return head, await reader.readexactly(length)


async def test_a_head_is_bounded_and_each_head_of_a_connection_counted_alone() -> None:
    """Three requests on one connection with headers of 0.6 MiB each (1.8 MiB of heads in all) are served, and a
    body of 2 MiB is no head; a head past MAX_HEAD_BYTES is answered 431 in the API's shape and closed."""
    echo = Echo()
    big = b"x-big: " + b"a" * (600 << 10) + b"\r\n"
    async with served(echo) as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
        for _ in range(3):
            writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n%scontent-length: 2\r\n\r\n{}" % big)
            head, body = await answer_of(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"size": 2}', head
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (2 << 20))
        for _ in range(32):
            writer.write(b"b" * (64 << 10))
            await writer.drain()
        head, body = await answer_of(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"size": %d}' % (2 << 20), head
        # Past the bound: the head sent in two parts, the second after the server has read the first (so the
        # server, having read every byte, closes without a reset that could take the answer with it).
        writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (MAX_HEAD_BYTES - 100))
        await asyncio.sleep(0.2)
        writer.write(b"a" * 200)
        raw = await read_all(reader)
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), raw[:200]
    assert json.loads(body) == {"type": "error", "error": {"type": "invalid_request_error", "message": ANY}}
    assert echo.received.count("http.request") >= 4 and len(echo.received) == echo.received.count("http.request")


class Flood:
    """An app that streams `chunks` chunks of 64 KiB as fast as the server takes them, and says when it is done."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.done = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        head = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % (self.chunks << 16))]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for _ in range(self.chunks):  # once the connection is gone, each send returns at once
            await asyncio.sleep(0)  # as a relay awaits its upstream between chunks (the writes of a turn go as one)
            await send({"type": "http.response.body", "body": b"z" * (1 << 16), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        self.done.set()


@asynccontextmanager
async def flooded(monkeypatch: pytest.MonkeyPatch, chunks: int) -> AsyncIterator[tuple[Flood, socket.socket]]:
    """A Flood served with CLIENT_TIMEOUT set short, asked for its answer by a client socket with a small receive
    buffer (so the server's send buffers fill soon when it does not read)."""
    flood = Flood(chunks)
    async with timed_server(monkeypatch, flood) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        try:
            yield flood, sock
        finally:
            sock.close()


async def test_an_answer_the_client_does_not_read_is_given_up_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 MB (more than the kernel's buffers take) to a client that reads nothing: the connection is aborted once
    the answer has waited a timeout with its buffer full, and the app's stream ends (a relay would close its
    upstream, and the engine abort the generation)."""
    loop = asyncio.get_running_loop()
    async with flooded(monkeypatch, 256) as (flood, sock):
        asked = time.monotonic()
        await asyncio.wait_for(flood.done.wait(), CLIENT_TIMEOUT_S * 10)
        elapsed = time.monotonic() - asked
        received = 0  # what the kernel had taken of the answer still comes, then the end
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5):
            received += len(chunk)
    assert CLIENT_TIMEOUT_S <= elapsed <= CLIENT_TIMEOUT_S * 1.25 + 1.0, elapsed  # + the time to fill the buffers
    assert received < 16 << 20


async def test_an_answer_read_slowly_but_steadily_is_not_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 MB read 256 KiB each third of a timeout (about 0.75 MB/s): the server's buffer is full all along, and the
    kernel's drains too slowly to let it move before a timeout has passed, but it drains, so the answer is whole."""
    loop = asyncio.get_running_loop()
    async with flooded(monkeypatch, 64) as (flood, sock):
        data, whole = bytearray(), 0
        while not whole or len(data) < whole:
            await asyncio.sleep(CLIENT_TIMEOUT_S / 3)
            goal = len(data) + (1 << 18)
            while len(data) < goal and not (whole and len(data) >= whole):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5)
                assert chunk, "the server closed the connection"
                data += chunk
                if not whole and b"\r\n\r\n" in data:
                    whole = data.index(b"\r\n\r\n") + 4 + (4 << 20)
        assert flood.done.is_set()
    assert bytes(data.partition(b"\r\n\r\n")[2]) == b"z" * (4 << 20)


async def test_a_server_that_names_no_protocol_speaks_ours_once_it_is_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray Serve builds each router replica's server itself, naming no protocol (ray_mode/serve_app.py): the replica
    makes ours uvicorn's default. Its timeouts hold; the app, run on another thread's loop under Serve, is handed no
    disconnect hook or header lines (a hook fired here would cancel a task of that loop from this one)."""
    monkeypatch.setitem(uvicorn_config.HTTP_PROTOCOLS, "auto", uvicorn_config.HTTP_PROTOCOLS["auto"])  # restored after
    CoalescingHttpToolsProtocol.as_uvicorn_default(CLIENT_TIMEOUT_S)
    scopes: list[dict[str, Any]] = []

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scopes.append(scope)
        await app(scope, receive, send)

    async with served(recording, naming_no_protocol=True) as (server, url):
        protocol = server.config.http_protocol_class
        assert issubclass(protocol, CoalescingHttpToolsProtocol) and protocol.client_timeout_s == CLIENT_TIMEOUT_S
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/plain")).json() == {"ok": True}
        assert [s["path"] for s in scopes] == ["/plain"] and not {DISCONNECT_HOOK, HEAD_LINES} & set(scopes[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
        started = time.monotonic()
        await trickle_head(writer)
        raw = await read_all(reader)
        writer.close()
        assert timeout_answer(raw)["error"]["code"] == "request_timeout"
        assert within_the_timeout(time.monotonic() - started)
