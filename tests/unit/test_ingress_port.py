"""wait_until_bindable: a direct-ingress replica waits for the API port before Serve binds it (real sockets); and
reuse_address_on_rebind: Serve's own replica server binds over a stopped replica's connections in TIME_WAIT.

Without SO_REUSEADDR the probe binds as Ray 2.60 does: a port someone still holds (a listener here; the stopped
replica's connections in TIME_WAIT where Serve's bind is not wrapped) is waited for, a free one is not.
"""

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from serverless_vllm.ray_mode.ingress import reuse_address_on_rebind, wait_until_bindable
from serverless_vllm.testing.ports import free_port


def held_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_free_port_returns_at_once() -> None:
    sock = held_port()
    port = sock.getsockname()[1]
    sock.close()
    t0 = time.monotonic()
    wait_until_bindable("127.0.0.1", port, timeout_s=10)
    assert time.monotonic() - t0 < 0.5


def test_waits_until_the_holder_lets_go() -> None:
    sock = held_port()
    port = sock.getsockname()[1]
    threading.Timer(1.5, sock.close).start()
    t0 = time.monotonic()
    wait_until_bindable("127.0.0.1", port, timeout_s=30)
    assert 1.4 < time.monotonic() - t0 < 10
    with socket.socket() as probe:  # and it really is free now, without SO_REUSEADDR
        probe.bind(("127.0.0.1", port))


def test_gives_up_after_its_timeout() -> None:
    sock = held_port()
    try:
        t0 = time.monotonic()
        wait_until_bindable("127.0.0.1", sock.getsockname()[1], timeout_s=1.0)
        assert 0.9 < time.monotonic() - t0 < 5  # then Serve's own bind fails and reports it
    finally:
        sock.close()


def _time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is `port` (/proc/net/tcp: state 06)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "06")


async def _serve_once_and_stop(start: Any, port: int) -> None:
    """Serve's replica server on `port` answers one request on a kept-alive connection, then stops: it closes that
    connection first, which leaves it in TIME_WAIT on the server's side, as a redeployed replica's do."""
    from ray.serve.config import HTTPOptions

    task, server = await start(_app, HTTPOptions(host="127.0.0.1", port=port), event_loop=asyncio.get_running_loop())
    await _started(server)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
        server.should_exit = True
        await task
    for _ in range(200):  # the client's FIN may be processed a moment after its close() returns, on a busy machine
        if _time_wait_on(port):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no connection of port {port} in TIME_WAIT: the scenario is not the one tested")


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_replica_binds_over_the_last_ones_time_wait_but_never_beside_a_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve's own replica server (Ray 2.60), wrapped by reuse_address_on_rebind: the port of a server that just
    stopped, with a connection in TIME_WAIT, is bound again at once; a port where a replica still listens is not.
    Unwrapped, the second bind fails (Serve raises "Failed to bind")."""
    from ray.serve._private import http_util, replica

    monkeypatch.setattr(replica, "start_asgi_http_server", replica.start_asgi_http_server)  # restored afterwards
    monkeypatch.setattr(http_util, "set_socket_reuse_port", http_util.set_socket_reuse_port)
    assert reuse_address_on_rebind() and reuse_address_on_rebind()  # a second call leaves it wrapped once
    start = replica.start_asgi_http_server
    port = free_port()

    async def scenario() -> None:
        from ray.serve.config import HTTPOptions

        options = HTTPOptions(host="127.0.0.1", port=port)
        await _serve_once_and_stop(start, port)
        t0 = time.monotonic()
        wait_until_bindable("127.0.0.1", port, timeout_s=5.0, reuse_address=True)
        assert time.monotonic() - t0 < 0.5  # TIME_WAIT is no reason to wait any more
        task, server = await start(_app, options, event_loop=asyncio.get_running_loop())
        try:
            await _started(server)
            t0 = time.monotonic()
            wait_until_bindable("127.0.0.1", port, timeout_s=1.0, reuse_address=True)
            assert time.monotonic() - t0 >= 0.9  # a listener is waited for (until the probe gives up)
            with pytest.raises(RuntimeError, match="Failed to bind"):  # and never shared
                await start(_app, options, event_loop=asyncio.get_running_loop())
        finally:
            server.should_exit = True
            await task

    asyncio.run(scenario())


async def _started(server: Any) -> None:
    for _ in range(500):
        if server.started:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server did not start")
