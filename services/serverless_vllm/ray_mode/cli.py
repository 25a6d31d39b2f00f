"""`svllm ray-services` flags. Ray is imported only when the command runs."""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import DEFAULT_NAMESPACE, MANAGER_ACTOR_NAME, ROUTER_APP_NAME


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ray-services", help="hybrid mode: manager as a detached Ray actor, router as a Ray Serve application"
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: a running one, else start a local one; 'local' forces that)",
    )
    p.add_argument("--namespace", default=os.environ.get("SVLLM_RAY_NAMESPACE", DEFAULT_NAMESPACE))
    p.add_argument("--manager-name", default=MANAGER_ACTOR_NAME)
    p.add_argument("--app-name", default=ROUTER_APP_NAME, help="Serve application name of the router")
    p.add_argument("--host", default=os.environ.get("SERVE_HOST", "0.0.0.0"), help="Serve HTTP host")
    p.add_argument("--port", type=int, default=int(os.environ.get("SERVE_PORT", 8000)), help="Serve HTTP port")
    p.add_argument(
        "--replicas",
        type=int,
        default=int(os.environ.get("ROUTER_REPLICAS", 1)),
        help="router replicas (with direct ingress at most one per node)",
    )
    p.add_argument(
        "--ingress",
        choices=("direct", "proxy"),
        default=os.environ.get("SERVE_INGRESS", "direct"),
        help="direct: each router replica serves --port itself (Serve direct ingress, no proxy hop); "
        "proxy: Serve's proxy on every node forwards to the replicas",
    )
    p.add_argument(
        "--proxy-port",
        type=int,
        default=int(os.environ.get("SERVE_PROXY_PORT", 8001)),
        help="Serve's own proxy under direct ingress (head node)",
    )
    p.add_argument("--max-ongoing-requests", type=int, default=1000, help="per router replica")
    p.add_argument("--router-num-cpus", type=float, default=0.0, help="CPUs each router replica reserves")
    p.add_argument(
        "--no-pin-manager",
        action="store_true",
        help="let the manager actor run on any node (only with MANAGER_DB on shared storage)",
    )
    p.add_argument("--dashboard-host", default="127.0.0.1", help="when starting a local cluster")
    p.add_argument("--dashboard-port", type=int, default=8265, help="when starting a local cluster")
    p.add_argument("--db", help="SQLite path of the registry (env MANAGER_DB), on the head node")
    p.add_argument(
        "--heartbeat-timeout", dest="heartbeat_timeout_s", type=float, help="seconds without heartbeat before unhealthy"
    )
    p.add_argument(
        "--replace-manager",
        action="store_true",
        help="replace a running manager actor (new settings, credentials or version)",
    )
    p.add_argument("--detach", action="store_true", help="return once deployed (needs a running cluster)")
    p.set_defaults(func=cmd_ray_services)


def cmd_ray_services(args: argparse.Namespace) -> None:
    from ..config import AuthSettings, ManagerSettings, RouterSettings
    from .services import RayServicesSettings, run

    settings = RayServicesSettings(
        address=args.address or None,
        namespace=args.namespace,
        manager_name=args.manager_name,
        app_name=args.app_name,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        ingress=args.ingress,
        proxy_port=args.proxy_port,
        access_log=args.log_level.lower() == "debug",
        max_ongoing_requests=args.max_ongoing_requests,
        router_num_cpus=args.router_num_cpus,
        pin_manager_to_head=not args.no_pin_manager,
        replace_manager=args.replace_manager,
        dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port,
        detach=args.detach,
    )
    manager = ManagerSettings.from_env(db_path=args.db, heartbeat_timeout_s=args.heartbeat_timeout_s)
    if manager.db_path != ":memory:":
        # The actor does not run in this directory: a relative path would land elsewhere.
        manager = manager.model_copy(update={"db_path": os.path.abspath(manager.db_path)})
    run(settings, manager, RouterSettings.from_env(), AuthSettings.from_env())
