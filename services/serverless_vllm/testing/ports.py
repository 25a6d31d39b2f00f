"""Free loopback ports for the processes that tests and benchmarks start."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Container
from pathlib import Path

# Ports a test publishes long after choosing them (an appliance's router, bound by Docker minutes later) come from
# below the kernel's ephemeral range: there no bind(0) elsewhere (another xdist process, an engine) can take one in
# between. The band for such ports, and the band above it for Ray's consecutive ranges, so the two never meet.
PUBLISHED_BAND = (10000, 20000)
RAY_BAND_LOW = 20000


def ephemeral_low() -> int:
    """The first port the kernel hands out for bind(0) (32768 when /proc does not say)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


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


def published_port(avoid: Container[int] = ()) -> int:
    """A free port from PUBLISHED_BAND, not in `avoid`: for a port bound long after it is chosen."""
    low, high = PUBLISHED_BAND
    start = random.randrange(low, high)  # a random start: two processes rarely probe the same ports
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}-{high}")
