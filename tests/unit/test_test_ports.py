"""The port helpers that tests and benchmarks start their processes with (serverless_vllm.testing)."""

from __future__ import annotations

import socket
from pathlib import Path

from serverless_vllm.testing.ports import PUBLISHED_BAND, ephemeral_low, free_ports, published_port
from serverless_vllm.testing.ray_head import WORKER_PORTS, free_port_range, ray_head_args


def test_free_ports_are_distinct_and_avoid_what_they_are_told() -> None:
    avoid = set(free_ports(20))
    ports = free_ports(20, avoid)
    assert len(set(ports)) == 20
    assert not avoid & set(ports)


def test_free_port_range_is_bindable() -> None:
    base = free_port_range(16)
    socks = [socket.socket() for _ in range(16)]
    try:
        for offset, s in enumerate(socks):
            s.bind(("127.0.0.1", base + offset))
    finally:
        for s in socks:
            s.close()


def test_ray_head_ports_are_explicit_distinct_and_outside_the_workers_range() -> None:
    gcs, dashboard = free_ports(2)
    args = ray_head_args(Path("/venv/bin/ray"), Path("/tmp/svr-x"), gcs, dashboard, num_cpus=3)
    flags = {flag: int(args[i + 1]) for i, flag in enumerate(args) if flag.endswith("-port")}
    low, high = flags.pop("--min-worker-port"), flags.pop("--max-worker-port")
    assert high - low + 1 == WORKER_PORTS
    # Ray refuses shared ports and component ports inside the workers' range.
    assert len(set(flags.values())) == len(flags) == 9
    assert not any(low <= port <= high for port in flags.values())
    assert flags["--port"] == gcs and flags["--dashboard-port"] == dashboard
    assert args[:4] == ["/venv/bin/ray", "start", "--head", "--block"]
    assert args[args.index("--num-cpus") + 1] == "3" and args[args.index("--temp-dir") + 1] == "/tmp/svr-x"


def test_ports_bound_later_come_from_outside_the_kernels_ephemeral_range() -> None:
    """An appliance test's router port is bound by Docker minutes after it is chosen; a port the kernel may hand
    to any bind(0) meanwhile (an engine or router of the other xdist process) was taken once in CI, and the
    appliance's clients talked to another test's router."""
    low = ephemeral_low()
    ports = [published_port() for _ in range(50)]
    assert all(PUBLISHED_BAND[0] <= p < PUBLISHED_BAND[1] < low for p in ports)
    assert published_port(avoid=set(range(*PUBLISHED_BAND)) - {PUBLISHED_BAND[0] + 7}) == PUBLISHED_BAND[0] + 7
    for _ in range(20):
        base = free_port_range(WORKER_PORTS)
        assert base + WORKER_PORTS <= low
