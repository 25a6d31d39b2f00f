"""The router as a Ray Serve deployment: the same FastAPI app as in HTTP mode, built on each replica."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from ..config import AuthSettings, RouterSettings
from ..dataplane.server_protocol import CoalescingHttpToolsProtocol
from ..router.app import create_router_app
from . import package_logging
from .client import RayManagerClient
from .ingress import Ingress, deployment_options, reuse_address_on_rebind, wait_until_bindable

# Settings that are per process or meaningless under Serve (Serve owns the socket; each replica names itself).
_PER_REPLICA = {"router_id", "host", "port", "manager_url", "processes"}


@serve.ingress()  # late-bound: Serve calls __serve_build_asgi_app__ on each replica, then runs its lifespan
class RouterIngress:
    def __init__(
        self,
        settings: dict[str, Any],
        auth: AuthSettings,
        manager_name: str,
        namespace: str,
        api_address: tuple[str, int] | None,
        client_timeout_s: float,
    ) -> None:
        package_logging()
        if api_address is not None:  # direct ingress: Serve binds this port for the replica after this returns
            wait_until_bindable(*api_address, reuse_address=reuse_address_on_rebind())
            # ... and serves it with uvicorn's default protocol: ours, as in HTTP mode (slow clients' timeout, the
            # head's bound, errors in the API's shape, one write per response). Serve's proxy is Serve's own.
            CoalescingHttpToolsProtocol.as_uvicorn_default(client_timeout_s)
        # Built here, in the replica: each replica gets its own router_id, table and manager client.
        self._settings = RouterSettings(**settings)
        self._auth = auth  # from the deploying command: a replica's env is the raylet's, not the operator's
        self._manager_name = manager_name
        self._namespace = namespace

    def __serve_build_asgi_app__(self) -> FastAPI:
        # The lifespan (table sync with the manager actor) runs in the replica once this returns.
        # Router -> manager is a Ray call inside the cluster: no HTTP credential to present.
        return create_router_app(
            self._settings, lambda: RayManagerClient(self._manager_name, self._namespace), auth=self._auth
        )


def router_application(
    settings: RouterSettings,
    auth: AuthSettings,
    *,
    manager_name: str,
    namespace: str,
    replicas: int,
    max_ongoing_requests: int,
    num_cpus: float,
    ingress: Ingress,
    api_address: tuple[str, int],
    access_log: bool,
    client_timeout_s: float,
) -> Application:
    deployment = serve.deployment(
        RouterIngress,
        name="Router",
        num_replicas=replicas,
        # Serve's default (5) would queue requests at the proxy while replicas idle waiting on engines.
        max_ongoing_requests=max_ongoing_requests,
        # A replica stopping (a redeploy, a scale-down, the cluster's shutdown) lets its requests finish, as an HTTP
        # router does at SIGTERM (Serve's default gives them 20 s).
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        # Serve's log line per request, like uvicorn's in HTTP mode, only at debug level: it is a file write (and a
        # stderr copy) per request; request counts and latencies are in /metrics.
        logging_config={"enable_access_log": access_log},
        **deployment_options(ingress, num_cpus),
    )
    return deployment.bind(
        settings.model_dump(mode="json", exclude=_PER_REPLICA),
        auth,
        manager_name,
        namespace,
        api_address if ingress == "direct" else None,
        client_timeout_s,
    )
