"""`svllm ray-services` flags. Ray is imported only when the command runs."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..cli_flags import add_flag, command_parser, flag_values
from ..config import AuthSettings, CliSettings, ManagerSettings, RaySettings, RouterSettings
from . import MANAGER_ACTOR_NAME, ROUTER_APP_NAME

# Flags of ray_mode/services.RayServicesSettings fields without an environment variable: None (not given) leaves
# that model's default.
_OPTIONS = (
    "max_ongoing_requests",
    "router_num_cpus",
    "dashboard_host",
    "dashboard_port",
    "replace_manager",
    "detach",
)


def add_parser(sub: Any) -> None:
    p = command_parser(
        sub,
        "ray-services",
        "hybrid mode: manager as a detached Ray actor, router as a Ray Serve application",
        RaySettings,
        ManagerSettings,
        RouterSettings,
    )
    add_flag(p, RaySettings, "address", "--address")
    add_flag(p, RaySettings, "namespace", "--namespace")
    p.add_argument("--manager-name", default=MANAGER_ACTOR_NAME, help="name of the manager actor")
    p.add_argument("--app-name", default=ROUTER_APP_NAME, help="Serve application name of the router")
    add_flag(p, RaySettings, "host", "--host")
    add_flag(p, RaySettings, "port", "--port")
    add_flag(p, RaySettings, "replicas", "--replicas")
    add_flag(p, RaySettings, "ingress", "--ingress")
    add_flag(p, RaySettings, "proxy_port", "--proxy-port")
    p.add_argument("--max-ongoing-requests", type=int, help="per router replica")
    p.add_argument("--router-num-cpus", type=float, help="CPUs each router replica reserves")
    p.add_argument(
        "--no-pin-manager",
        action="store_true",
        help="let the manager actor run on any node (only with MANAGER_DB on shared storage)",
    )
    p.add_argument("--dashboard-host", help="when starting a local cluster")
    p.add_argument("--dashboard-port", type=int, help="when starting a local cluster")
    add_flag(p, ManagerSettings, "db_path", "--db")
    add_flag(p, ManagerSettings, "heartbeat_timeout_s", "--heartbeat-timeout")
    p.add_argument(
        "--replace-manager",
        action="store_true",
        default=None,
        help="replace a running manager actor (new settings, credentials or version)",
    )
    p.add_argument("--detach", action="store_true", default=None, help="return once deployed (needs a running cluster)")
    p.set_defaults(func=cmd_ray_services)


def ray_services_settings(args: argparse.Namespace) -> tuple[dict[str, Any], ManagerSettings]:
    """The keyword arguments of RayServicesSettings (from RaySettings and the command's own flags), and the
    manager's settings (the actor's database path made absolute: the actor does not run in this directory)."""
    options = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    cli = CliSettings.from_env()
    services = {
        **RaySettings.from_env(**flag_values(args, RaySettings)).model_dump(),
        **options,
        "manager_name": args.manager_name,
        "app_name": args.app_name,
        "access_log": args.log_level.lower() == "debug",
        "client_timeout_s": cli.client_timeout_s,
        "keep_alive_s": cli.keep_alive_s,
        "pin_manager_to_head": not args.no_pin_manager,
    }
    manager = ManagerSettings.from_env(**flag_values(args, ManagerSettings))
    if manager.db_path != ":memory:":
        manager = manager.model_copy(update={"db_path": os.path.abspath(manager.db_path)})
    return services, manager


def cmd_ray_services(args: argparse.Namespace) -> None:
    from .services import RayServicesSettings, run

    services, manager = ray_services_settings(args)
    run(RayServicesSettings(**services), manager, RouterSettings.from_env(), AuthSettings.from_env())
