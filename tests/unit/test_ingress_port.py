"""wait_until_bindable: a direct-ingress replica waits for the API port before Serve binds it (real sockets).

Ray binds without SO_REUSEADDR, so the probe binds the same way: a port someone still holds (a listener here;
in production, the stopped replica's connections in TIME_WAIT) is waited for, a free one is not.
"""

import socket
import threading
import time

from serverless_vllm.ray_mode.ingress import wait_until_bindable


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
