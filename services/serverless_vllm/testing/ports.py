"""Free loopback ports for the processes that tests and benchmarks start."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Container


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int, avoid: Container[int] = ()) -> list[int]:
    """`n` distinct free ports, none in `avoid`: the sockets are held together while the kernel picks, so two
    calls of free_port() in a row cannot hand out the same port twice."""
    while True:
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(n)]
            for s in socks:
                s.bind(("127.0.0.1", 0))
            ports = [int(s.getsockname()[1]) for s in socks]
        if not any(p in avoid for p in ports):
            return ports
