"""The command line of a private Ray head for tests and benchmarks: every port explicit and distinct, its own temp
dir, so it never joins or disturbs another cluster on the machine."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

from .ports import RAY_BAND_LOW, ephemeral_low, free_ports

WORKER_PORTS = 64  # one per Ray worker process (actors, Serve replicas, tasks)

# Component ports Ray would otherwise pick from fixed defaults or at random (and may then collide).
_COMPONENTS = (
    "--node-manager-port",
    "--object-manager-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(200):
        # Below the ephemeral range: a bind(0) elsewhere cannot take a port between this check and Ray's bind.
        base = random.randrange(RAY_BAND_LOW, max(RAY_BAND_LOW + 1, ephemeral_low() - count))
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def ray_head_args(ray_bin: Path, temp_dir: Path, port: int, dashboard_port: int, num_cpus: int = 2) -> list[str]:
    """`ray start --head --block` on 127.0.0.1 with the GCS on `port` and the dashboard on `dashboard_port`."""
    workers = free_port_range(WORKER_PORTS)
    while port in range(workers, workers + WORKER_PORTS) or dashboard_port in range(workers, workers + WORKER_PORTS):
        workers = free_port_range(WORKER_PORTS)  # Ray refuses a component port inside the workers' range
    taken = {*range(workers, workers + WORKER_PORTS), port, dashboard_port}
    ports = {
        "--port": port,
        "--dashboard-port": dashboard_port,
        **dict(zip(_COMPONENTS, free_ports(len(_COMPONENTS), taken), strict=True)),
        "--min-worker-port": workers,
        "--max-worker-port": workers + WORKER_PORTS - 1,
    }
    args = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        # Short temp dir: Ray's unix sockets live below it and must stay under 107 bytes.
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        str(num_cpus),
        "--object-store-memory",
        str(200 * 2**20),
    ]
    for flag, value in ports.items():
        args += [flag, str(value)]
    return args
