"""The services' HTTP server protocol (server_protocol.py) in a real uvicorn server on loopback, built by the same
`cli._server` the services use, with a real client. What reaches the socket is recorded under the coalescing
layer, so the test sees the writes the kernel gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from serverless_vllm import cli
from serverless_vllm.dataplane.server_protocol import HEAD_LINES, CoalescingHttpToolsProtocol
from serverless_vllm.testing.ports import free_port

EVENT_GAP_S = 0.05


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
    port = free_port()
    server = cli._server(app, "127.0.0.1", port, "warning")
    assert server.config.http is CoalescingHttpToolsProtocol  # what the services run
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # uvicorn says nothing when it is up; poll its flag, for 5 s at most
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", writes
    finally:
        server.should_exit = True
        await task


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
