"""The router's FastAPI app. Both deployments serve this same app: uvicorn/gunicorn in HTTP mode, Ray Serve
in hybrid mode; only the ManagerAPI implementation handed in differs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request, Response

from ..config import AuthSettings, RouterSettings
from ..dataplane.app_state import AppState
from ..dataplane.body import InferenceRequest, read_inference
from ..dataplane.disconnect import until_disconnect
from ..dataplane.endpoints import InferenceEndpoint
from ..dataplane.headers import SESSION_HEADER
from ..dataplane.heap import freeze_startup_heap
from ..dataplane.inference_lane import install_inference_lane
from ..dataplane.inference_routes import inference_routes
from ..dataplane.relay import UpstreamClient
from ..dataplane.server_protocol import HEAD_LINES
from ..errors import install_error_handlers
from ..manager.protocol import ManagerAPI
from ..metrics.router import MODEL_SCOPE_KEY, RouterMetrics, install_router_metrics
from ..security.auth import install_guard, router_policy
from ..security.keys import KEY_SCOPE, ActiveKey
from .fleet_api import fleet_router
from .models_api import models_router
from .policy import RequestKey
from .prefix import PrefixAffinity
from .proxy import Forwarder
from .responses import ResponseMap, ResponsesRouter
from .state import RouterState
from .sync import ManagerSync
from .table import RouteTable
from .tenants import Tenants

log = logging.getLogger(__name__)


def create_router_app(
    settings: RouterSettings,
    manager_factory: Callable[[], ManagerAPI],
    upstream_headers: dict[str, str] | None = None,
    auth: AuthSettings | None = None,
) -> FastAPI:
    """`manager_factory` is called once the event loop runs (clients bind to the loop they are made in).
    `auth`: credentials (default: from the environment); requests to workers carry the worker token."""
    state: AppState[RouterState] = AppState("router")
    auth = auth or AuthSettings.from_env()
    upstream_headers = {**auth.worker_headers(), **(upstream_headers or {})}

    def table_if_started() -> RouteTable | None:
        started = state.peek()
        return started.table if started is not None else None

    metrics = RouterMetrics(table_if_started)
    # Keys made at run time: checked by the guard, limited and metered by the gate (router/tenants.py).
    tenants = Tenants(1.0 / (settings.key_limit_routers * settings.processes), metrics.model_label)
    metrics.registry.register(tenants.collector)
    metrics.registry.register(tenants.queue_wait)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager = manager_factory()
        prefix = PrefixAffinity(settings.prefix_blocks, settings.prefix_ttl_s, settings.prefix_spill)
        table = RouteTable(prefix=prefix)
        sync = ManagerSync(manager, table, settings.router_id, settings.report_interval_s)
        client = UpstreamClient(read_timeout_s=settings.request_timeout_s)
        forwarder = Forwarder(
            settings, table, sync, manager, client, upstream_headers, on_hold=metrics.observe_queue_wait
        )
        ids = ResponseMap(settings.responses_max_ids, settings.responses_retention_s)
        responses = ResponsesRouter(forwarder, table, ids, settings.responses_probe_replicas)
        state.set(
            RouterState(
                manager=manager, table=table, sync=sync, client=client, forwarder=forwarder, responses=responses
            )
        )
        await sync.start()
        if auth.enabled:  # without credentials no key is checked: no key table either
            await tenants.start(manager, table, settings)
        freeze_startup_heap()
        try:
            yield
        finally:
            await tenants.stop()
            await sync.stop()
            await client.close()
            await manager.close()

    app = FastAPI(title="serverless-vllm router", lifespan=lifespan)

    # ------------------------------------------------------------------ inference (the hot path)

    async def _inference(request: Request, endpoint: InferenceEndpoint) -> Response:
        inference = await read_inference(request, endpoint, settings.max_body_bytes, settings.allow_unknown_fields)
        request.scope[MODEL_SCOPE_KEY] = inference.alias  # the metrics middleware labels the request with it
        payload = inference.payload
        user = payload.get("user")
        session = request.headers.get(SESSION_HEADER) or (user if isinstance(user, str) and user else None)
        # What the model's routing policy may read: the session key, and the parsed body (the prefix policy hashes
        # the prompt from it, for models routed by prefix only).
        key = RequestKey(session, payload, endpoint.family)
        api_key = request.scope.get(KEY_SCOPE)  # a key made at run time: its models, limits and usage
        if api_key is not None:
            head = request.scope.get(HEAD_LINES)  # the server writes the key's x-ratelimit-* lines as they are
            served = tenants.gate.serve(api_key, inference, partial(_send, key, api_key), head)
            return await until_disconnect(request, served)
        if endpoint.family == "responses":
            return await until_disconnect(request, state.get().responses.create(inference, key))
        # A client that leaves before the first byte (held in a cold start, or waiting for a whole answer) cancels
        # the forward: its queue slot is freed and the upstream connection closed, so vLLM aborts the request.
        return await until_disconnect(request, state.get().forwarder.forward(inference, key))

    def _send(key: RequestKey, api_key: ActiveKey, inference: InferenceRequest) -> Awaitable[Response]:
        """A key's request, past its gate (which may have rewritten it to ask for usage)."""
        if inference.endpoint.family == "responses":
            return state.get().responses.create(inference, key, api_key)
        return state.get().forwarder.forward(inference, key)

    async def _stored_response(request: Request, response_id: str, action: str) -> Response:
        viewer = request.scope.get(KEY_SCOPE)  # a key made at run time reaches its own responses only
        following = state.get().responses.follow(response_id, action, request.url.query, viewer)
        return await until_disconnect(request, following)

    routes = inference_routes(_inference, _stored_response)
    app.include_router(routes)
    install_inference_lane(app, routes)  # the innermost middleware: before the others are added

    # Installed after the inference routes, so that those are the first routes matched against a request.
    install_error_handlers(app)
    install_router_metrics(app, metrics, lambda: state.get().manager)  # /metrics, /manager/metrics, /sd/*
    # Keys checked before anything (the environment's, then those made at run time).
    tenants.authenticator = install_guard(app, auth, "router", router_policy, settings.max_body_bytes, tenants.ring)

    app.include_router(models_router(state.get))  # /v1/models...
    app.include_router(fleet_router(state.get, settings.router_id))  # /health, /workers...
    app.include_router(tenants.routes())  # /v1/keys..., /v1/usage
    return app


def app_from_env() -> FastAPI:
    """Factory for gunicorn (`svllm router --workers N`): each process builds its own table from the env."""
    from ..manager.http_client import HTTPManagerClient

    settings = RouterSettings.from_env()
    headers = AuthSettings.from_env().admin_headers()  # the router's credential to the manager
    return create_router_app(settings, lambda: HTTPManagerClient(settings.manager_url, headers=headers))
