"""The relay's HTTP/1.1 client against real servers on loopback: uvicorn (what our worker and vLLM run) for the
normal paths, and a raw asyncio server that misbehaves on purpose for the faults."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from serverless_vllm.dataplane.http1 import Client, UpstreamError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Seen:
    """What the server saw: connections (by client port), bodies, streams the client abandoned."""

    def __init__(self) -> None:
        self.client_ports: list[int] = []
        self.paths: list[str] = []
        self.bodies: list[bytes] = []
        self.disconnected = asyncio.Event()


def make_app(seen: Seen) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.client_ports.append(scope["client"][1])
        seen.paths.append(scope["path"])
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen.bodies.append(body)
        if scope["path"].endswith("/stream"):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            for i in range(1000):
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
                await asyncio.sleep(0.01)
                if i == 2:
                    # Wait to learn whether the client went away (uvicorn reports it as http.disconnect).
                    try:
                        async with asyncio.timeout(2):
                            if (await receive())["type"] == "http.disconnect":
                                seen.disconnected.set()
                                return
                    except TimeoutError:
                        pass
            await send({"type": "http.response.body", "body": b""})
            return
        reply = b'{"echo": %d}' % len(body)
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"x-extra", b"yes")],
            }
        )
        await send({"type": "http.response.body", "body": reply})

    return app


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(make_app(seen), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(srv.serve())
    for _ in range(500):  # uvicorn says nothing when it is up; poll its flag, for 5 s at most
        if srv.started:
            break
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", seen
    srv.should_exit = True
    await task


async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    await reader.readexactly(length)


async def test_post_reads_status_headers_body_and_reuses_the_connection(server: tuple[str, Seen]) -> None:
    url, seen = server
    client = Client()
    for body in (b'{"a": 1}', b'{"bb": 22}'):
        resp = await client.post(url, "/v1/completions", body, {"content-type": "application/json"})
        assert resp.status == 201
        assert resp.headers["content-type"] == "application/json" and resp.headers["x-extra"] == "yes"
        assert await resp.read() == b'{"echo": %d}' % len(body)
        resp.close()
    assert seen.bodies == [b'{"a": 1}', b'{"bb": 22}']
    assert len(set(seen.client_ports)) == 1, "the second request should reuse the pooled connection"
    client.close()


async def test_base_url_path_prefix_is_kept(server: tuple[str, Seen]) -> None:
    url, seen = server
    client = Client()
    resp = await client.post(f"{url}/prefix/", "/x", b"{}", {})
    assert resp.status == 201
    resp.close()
    assert seen.paths == ["/prefix/x"]
    client.close()


async def test_stream_arrives_in_order_and_close_mid_stream_disconnects_the_server(server: tuple[str, Seen]) -> None:
    url, seen = server
    client = Client()
    resp = await client.post(url, "/stream", b"{}", {})
    got = b""
    async for chunk in resp.chunks():
        got += chunk
        if got.count(b"\n\n") >= 2:
            break
    assert got.startswith(b"data: 0\n\ndata: 1\n\n")
    resp.close()  # the client went away: the server must learn it (vLLM aborts the request then)
    await asyncio.wait_for(seen.disconnected.wait(), 5)
    # The next request gets a fresh connection, not the aborted one.
    again = await client.post(url, "/x", b"{}", {})
    assert again.status == 201 and await again.read() == b'{"echo": 2}'
    again.close()
    assert len(set(seen.client_ports)) == 2
    client.close()


async def test_refused_connection_is_marked_refused() -> None:
    with pytest.raises(UpstreamError) as info:
        await Client().post(f"http://127.0.0.1:{_free_port()}", "/v1/completions", b"{}", {})
    assert info.value.refused


async def test_silence_past_the_read_timeout_fails() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)
        writer.close()

    srv, url = await raw_server(mute)
    async with srv:
        with pytest.raises(UpstreamError, match="no data for"):
            await Client(read_timeout_s=0.3).post(url, "/", b"{}", {})


async def test_body_cut_short_raises_and_headers_cut_short_raise() -> None:
    async def cut_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"par')
        await writer.drain()
        writer.close()

    async def cut_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-ty")
        await writer.drain()
        writer.close()

    srv, url = await raw_server(cut_body)
    async with srv:
        resp = await Client().post(url, "/", b"{}", {})
        assert resp.status == 200
        with pytest.raises(UpstreamError, match="before the response ended"):
            await resp.read()
        resp.close()
    srv, url = await raw_server(cut_head)
    async with srv:
        with pytest.raises(UpstreamError):
            await Client().post(url, "/", b"{}", {})


async def test_garbage_is_an_upstream_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    srv, url = await raw_server(garbage)
    async with srv:
        with pytest.raises(UpstreamError, match="malformed"):
            await Client().post(url, "/", b"{}", {})


async def test_connection_the_server_closed_while_idle_is_not_reused() -> None:
    connections = 0

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive was implied, yet the server closes: the pool must notice

    srv, url = await raw_server(once_then_close)
    async with srv:
        client = Client()
        for _ in range(2):
            resp = await client.post(url, "/", b"{}", {})
            assert await resp.read() == b"ok"
            resp.close()
            await asyncio.sleep(0.1)
        assert connections == 2
        client.close()


async def test_a_reused_connection_closed_without_an_answer_is_retried_on_a_new_one() -> None:
    connections = 0

    async def keep_alive_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if connections == 1:
            # The race of a keep-alive timeout: the next request arrives as the server gives up on the connection.
            await read_request(reader)
            writer.transport.abort()
            return
        writer.close()

    srv, url = await raw_server(keep_alive_then_drop)
    async with srv:
        client = Client()
        first = await client.post(url, "/", b"{}", {})
        assert await first.read() == b"ok"
        first.close()
        second = await client.post(url, "/", b"{}", {})
        assert second.status == 200 and await second.read() == b"ok"
        second.close()
        assert connections == 2
        client.close()
