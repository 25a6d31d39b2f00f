"""How requests reach the router replicas in hybrid mode: Ray Serve's direct ingress, or its proxy.

Through Serve's proxy every request takes one more hop (proxy -> handle -> replica), which costs 10-16 ms of
CPU per request on the benchmark machine (docs/benchmarks.md). With direct ingress each router replica serves
HTTP itself, on the API port of its node, so clients talk to the same FastAPI app as in HTTP mode with only
Serve's per-request bookkeeping in between. One port means at most one router replica per node (like one proxy
per node); the proxy mode remains for several replicas on one node.

Ray 2.60 reads these switches from the environment of the Serve controller and of each replica, so they are
passed as runtime_env variables of those actors, never set in a process's own environment.
"""

from __future__ import annotations

import errno
import inspect
import logging
import socket
import time
from typing import Any, Literal

log = logging.getLogger(__name__)

Ingress = Literal["direct", "proxy"]


def controller_env(port: int) -> dict[str, str]:
    """The controller hands out replica ports: here exactly `port`, free again as soon as its replica is gone."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
        # The quarantine keeps a freed port from a load balancer's stale entries; nothing balances in front of
        # a replica here, and a redeploy's new replica needs the port at once.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def replica_env() -> dict[str, str]:
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # Same reason as the quarantine: no load balancer needs 30 s to notice a replica going away.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # Our app is async and never blocks its loop, so it can run on the loop of the replica's own HTTP server
        # instead of a second loop in its own thread: no thread hop per request (measured: 0.8 against 1.1-1.5 ms
        # of Ray CPU per request at concurrency 1, with the stand-in engine).
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }


def serve_start_options(ingress: Ingress, host: str, port: int, proxy_port: int, keep_alive_s: int) -> dict[str, Any]:
    """Keyword arguments of serve.start(). Under direct ingress Serve still runs one proxy on the head node; it
    gets `proxy_port`, out of the replicas' way. `keep_alive_s` (KEEP_ALIVE_TIMEOUT) reaches the proxies' servers
    and, under direct ingress, the replicas' (they take the controller's HTTP options)."""
    if ingress == "proxy":
        return {
            "http_options": {"host": host, "port": port, "location": "EveryNode", "keep_alive_timeout_s": keep_alive_s}
        }
    return {
        "http_options": {"host": host, "port": proxy_port, "keep_alive_timeout_s": keep_alive_s},
        "controller_options": {"runtime_env": {"env_vars": controller_env(port)}},
    }


def deployment_options(ingress: Ingress, num_cpus: float) -> dict[str, Any]:
    """Options of the router's serve.deployment() that depend on the ingress."""
    if ingress == "proxy":
        return {"ray_actor_options": {"num_cpus": num_cpus}}
    return {
        "max_replicas_per_node": 1,
        "ray_actor_options": {"num_cpus": num_cpus, "runtime_env": {"env_vars": replica_env()}},
    }


def reuse_address_on_rebind() -> bool:
    """In a direct-ingress replica, before Serve binds the API port: Serve (Ray 2.60) binds it without SO_REUSEADDR,
    so after a redeploy the port stayed refused while the stopped replica's closed connections sat in TIME_WAIT (up
    to 60 s on Linux, during which no router answered). Linux lets a socket bind over TIME_WAIT connections only when
    it and the socket that had them both set SO_REUSEADDR: every replica now binds with it, and a replica that is
    still listening still refuses the next one (no SO_REUSEPORT: two replicas never share the port). Serve's
    private names are wrapped here; where they differ (another Ray), False, and the replica only waits
    (wait_until_bindable)."""
    try:
        from ray.serve._private import http_util, replica
    except ImportError:
        return False
    start = getattr(replica, "start_asgi_http_server", None)
    if getattr(start, "reuses_address", False):
        return True
    if (
        start is None
        or not hasattr(http_util, "set_socket_reuse_port")
        or "enable_so_reuseport" not in inspect.signature(start).parameters
    ):
        log.warning("Serve's replica server is not the one this was written for: a redeploy waits for TIME_WAIT")
        return False

    def reuse_address(sock: socket.socket) -> bool:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return True

    async def start_reusing_address(*args: Any, **kwargs: Any) -> Any:
        kwargs["enable_so_reuseport"] = True  # its socket option step, which now sets SO_REUSEADDR alone
        return await start(*args, **kwargs)

    start_reusing_address.reuses_address = True  # type: ignore[attr-defined]
    # Only this replica's process: its one server is the direct-ingress one (Serve's proxy runs elsewhere).
    http_util.set_socket_reuse_port = reuse_address
    replica.start_asgi_http_server = start_reusing_address
    return True


def wait_until_bindable(host: str, port: int, timeout_s: float = 120.0, reuse_address: bool = False) -> None:
    """Called by a direct-ingress replica before Serve binds the API port for it: a failed bind makes the controller
    block the port for good. The probe binds as Serve will (`reuse_address`: reuse_address_on_rebind() is in
    effect), so it waits for a replica still listening there and, without SO_REUSEADDR, for a stopped replica's
    connections in TIME_WAIT (up to 60 s on Linux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    log.warning("port %s:%d is still in use; starting anyway", host, port)
                    break
        if not waited:
            log.info("waiting for %s:%d to be free (the previous router replica's connections)", host, port)
            waited = True
        time.sleep(0.5)
