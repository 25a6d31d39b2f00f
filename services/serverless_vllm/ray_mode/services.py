"""`svllm ray-services` (the design's start_ray_services.py): manager actor and Serve router in a Ray cluster."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict
from ray import serve

from ..config import AuthSettings, CliSettings, ManagerSettings, RouterSettings
from ..security.auth import Authenticator
from . import DEFAULT_NAMESPACE, MANAGER_ACTOR_NAME, ROUTER_APP_NAME
from .actor import get_or_create_manager
from .ingress import Ingress, serve_start_options
from .serve_app import router_application

log = logging.getLogger(__name__)


class RayServicesSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # None: the cluster of RAY_ADDRESS or `ray start` on this machine ("auto"), else a new local one.
    address: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    manager_name: str = MANAGER_ACTOR_NAME
    app_name: str = ROUTER_APP_NAME
    host: str = "0.0.0.0"
    port: int = 8000
    replicas: int = 1
    # "direct": each router replica serves `port` itself, at most one per node; "proxy": Serve's proxy on every
    # node forwards to the replicas (one more hop; any number of replicas). See ingress.py.
    ingress: Ingress = "direct"
    proxy_port: int = 8001  # Serve's own proxy under direct ingress (head node only)
    max_ongoing_requests: int = 1000
    router_num_cpus: float = 0.0
    access_log: bool = False  # Serve's line per request (LOG_LEVEL=debug turns it on, as in HTTP mode)
    # CLIENT_TIMEOUT, for the router replicas' own servers (direct ingress).
    client_timeout_s: float = CliSettings.model_fields["client_timeout_s"].default
    # KEEP_ALIVE_TIMEOUT, for Serve's proxies and the replicas' servers.
    keep_alive_s: int = CliSettings.model_fields["keep_alive_s"].default
    pin_manager_to_head: bool = True
    # Replace a running manager actor (new settings or credentials, an upgrade); registrations stay in SQLite.
    replace_manager: bool = False
    # Only used when this command starts the cluster itself.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    detach: bool = False
    health_interval_s: float = 10.0


def connect(settings: RayServicesSettings) -> bool:
    """Join the cluster (or start a local one). True if this process started it (and so owns it)."""
    if settings.address not in (None, "", "local"):
        ray.init(address=settings.address, namespace=settings.namespace)
        return False
    if settings.address is None:
        try:
            ray.init(address="auto", namespace=settings.namespace)
            return False
        except ConnectionError:
            log.info("no running Ray cluster found: starting a local one")
    # Ray starts its workers at niceness 15 to keep its own daemons responsive; here those workers are the
    # manager and the router replicas, which must not wait behind CPU engines on the same machine (a laptop,
    # the appliance) that the worker starts at ENGINE_NICE.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        namespace=settings.namespace,
        include_dashboard=True,
        dashboard_host=settings.dashboard_host,
        dashboard_port=settings.dashboard_port,
    )
    return True


def _replace_manager(settings: RayServicesSettings) -> None:
    try:
        old = ray.get_actor(settings.manager_name, namespace=settings.namespace)
    except ValueError:
        return
    log.info("replacing the running manager actor")
    ray.kill(old, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the name is free once the GCS has seen it die
        try:
            ray.get_actor(settings.manager_name, namespace=settings.namespace)
        except ValueError:
            return
        time.sleep(0.2)


def deploy(
    settings: RayServicesSettings, manager: ManagerSettings, router: RouterSettings, auth: AuthSettings
) -> dict[str, Any]:
    """Create or reuse the manager actor, then (re)deploy the router application. Returns the manager's health."""
    Authenticator(auth, "router")  # refuse a bad auth setup here, not in every replica's constructor
    _check_replicas_fit(settings)
    if settings.replace_manager:
        _replace_manager(settings)
    actor = get_or_create_manager(
        manager, auth, settings.manager_name, settings.namespace, settings.pin_manager_to_head
    )
    health: dict[str, Any] = ray.get(actor.health.remote(), timeout=120)
    running: ManagerSettings = ray.get(actor.settings.remote(), timeout=30)
    if running != manager:
        # get_if_exists: a running actor keeps the settings it was created with (--replace-manager changes them).
        log.warning(
            "the manager actor already runs with other settings (%s); they are kept "
            "(run with --replace-manager to apply the new ones)",
            running,
        )
    log.info(
        "manager actor '%s' (namespace %s) ready: epoch %s, %s model(s)",
        settings.manager_name,
        settings.namespace,
        health["epoch"],
        health["models"],
    )
    serve.start(
        **serve_start_options(
            settings.ingress, settings.host, settings.port, settings.proxy_port, settings.keep_alive_s
        )
    )
    app = router_application(
        router,
        auth,
        manager_name=settings.manager_name,
        namespace=settings.namespace,
        replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        num_cpus=settings.router_num_cpus,
        ingress=settings.ingress,
        api_address=(settings.host, settings.port),
        access_log=settings.access_log,
        client_timeout_s=settings.client_timeout_s,
    )
    if settings.ingress == "direct":
        _stop_running_router(settings.app_name)
    serve.run(app, name=settings.app_name, route_prefix="/")
    log.info(
        "router application '%s' running (%d replica(s), %s ingress): OpenAI API at http://%s:%d/v1",
        settings.app_name,
        settings.replicas,
        settings.ingress,
        settings.host,
        settings.port,
    )
    return health


def _stop_running_router(app_name: str) -> None:
    """Under direct ingress a node's API port belongs to one replica, so Serve's rolling update (start the new
    replica, then stop the old) cannot work, and Serve replaces every replica on each deploy: a running router
    is stopped first. The API is down for the few seconds a replica takes to start."""
    if app_name in serve.status().applications:
        log.info("stopping the running router application '%s' before deploying it again", app_name)
        serve.delete(app_name)


def _check_replicas_fit(settings: RayServicesSettings) -> None:
    """Direct ingress gives each node's router replica the API port: more replicas than nodes could never start,
    and Serve would wait for them forever."""
    if settings.ingress != "direct":
        return
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if settings.replicas > nodes:
        raise SystemExit(
            f"--replicas {settings.replicas} with direct ingress needs {settings.replicas} nodes "
            f"(one router replica per node serves port {settings.port}); the cluster has {nodes}. "
            "Use --ingress proxy for several replicas on one node."
        )


def _watch(settings: RayServicesSettings, stop: threading.Event) -> None:
    """Foreground mode: report the manager's health now and then until told to stop."""
    actor = ray.get_actor(settings.manager_name, namespace=settings.namespace)
    healthy = True
    while not stop.wait(settings.health_interval_s):
        try:
            ray.get(actor.health.remote(), timeout=30)
            if not healthy:
                log.info("manager actor answers again")
            healthy = True
        except Exception as exc:  # restarting, or the cluster is going away
            if healthy:
                log.warning("manager actor does not answer (%s); Ray restarts it", type(exc).__name__)
            healthy = False


def _stop_on_signals() -> threading.Event:
    """Ours, not Ray's (which would kill the process): the first SIGINT/SIGTERM stops cleanly once the deployment
    in progress is done; a second one interrupts at once."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def run(settings: RayServicesSettings, manager: ManagerSettings, router: RouterSettings, auth: AuthSettings) -> None:
    owns_cluster = connect(settings)
    if owns_cluster and settings.detach:
        ray.shutdown()
        raise SystemExit(
            "--detach needs a running Ray cluster (`ray start --head`): a cluster started by this "
            "command would stop with it"
        )
    stop = _stop_on_signals()
    try:
        deploy(settings, manager, router, auth)
        if settings.detach:
            return
        log.info(
            "services up; Ctrl-C %s",
            "stops the local cluster" if owns_cluster else "leaves them running in the cluster",
        )
        _watch(settings, stop)
    finally:
        if owns_cluster:
            serve.shutdown()
        # Leaving a cluster this command did not start keeps the detached actor and the Serve app running.
        ray.shutdown()
