"""Hybrid deployment: the manager as a detached Ray actor, the router as a Ray Serve deployment.

Both are thin adapters over the same code as the plain-HTTP services (ManagerCore, create_router_app);
workers stay independent HTTP services outside the cluster. `ray` is imported only inside these modules,
so the rest of the package works without it.
"""

DEFAULT_NAMESPACE = "serverless-vllm"
MANAGER_ACTOR_NAME = "manager"
ROUTER_APP_NAME = "router"


def package_logging() -> None:
    """Ray workers keep the root logger at WARNING; our INFO lines belong in the actor's/replica's log."""
    import logging

    pkg = logging.getLogger("serverless_vllm")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
