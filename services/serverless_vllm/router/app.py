"""The router's FastAPI app. Both deployments serve this same app: uvicorn/gunicorn in HTTP mode, Ray Serve
in hybrid mode; only the ManagerAPI implementation handed in differs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request, Response
from fastapi.responses import JSONResponse

from ..config import AuthSettings, RouterSettings
from ..dataplane.body import read_json_body
from ..dataplane.headers import SESSION_HEADER
from ..dataplane.heap import freeze_startup_heap
from ..dataplane.inference_routes import inference_routes
from ..dataplane.relay import UpstreamClient
from ..errors import install_error_handlers
from ..manager.protocol import ManagerAPI
from ..metrics.router import MODEL_SCOPE_KEY, RouterMetrics, install_router_metrics
from ..schemas import (
    ALIAS_PATTERN,
    Heartbeat,
    HeartbeatReply,
    ModelInfo,
    ModelPatch,
    ModelSpec,
    WorkerInfo,
    WorkerRegistration,
)
from ..security.auth import install_guard, router_policy
from ..security.inference import check_inference
from .proxy import Forwarder
from .sync import ManagerSync
from .table import RouteTable

log = logging.getLogger(__name__)

# A path alias that cannot be registered is a clear 400, never a manager call.
Alias = Annotated[str, Path(pattern=ALIAS_PATTERN)]


def _retrieve_shape(info: ModelInfo) -> dict[str, Any]:
    """GET /v1/models/{alias}: our model state, plus the fields of OpenAI's model object so clients parse it."""
    return {
        "id": info.alias,
        "object": "model",
        "created": int(info.created_at),
        "owned_by": "serverless-vllm",
        **info.model_dump(mode="json"),
    }


def create_router_app(
    settings: RouterSettings,
    manager_factory: Callable[[], ManagerAPI],
    upstream_headers: dict[str, str] | None = None,
    auth: AuthSettings | None = None,
) -> FastAPI:
    """`manager_factory` is called once the event loop runs (clients bind to the loop they are made in).
    `auth`: credentials (default: from the environment); requests to workers carry the worker token."""
    state: dict[str, Any] = {}
    auth = auth or AuthSettings.from_env()
    upstream_headers = {**auth.worker_headers(), **(upstream_headers or {})}
    metrics = RouterMetrics(lambda: state.get("table"))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager = manager_factory()
        table = RouteTable()
        sync = ManagerSync(manager, table, settings.router_id, settings.report_interval_s)
        client = UpstreamClient(read_timeout_s=settings.request_timeout_s)
        state.update(
            manager=manager,
            table=table,
            sync=sync,
            forwarder=Forwarder(
                settings, table, sync, manager, client, upstream_headers, on_hold=metrics.observe_queue_wait
            ),
        )
        await sync.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            await sync.stop()
            await client.close()
            await manager.close()

    app = FastAPI(title="serverless-vllm router", lifespan=lifespan)

    def manager() -> ManagerAPI:
        return state["manager"]

    # ------------------------------------------------------------------ inference (the hot path)

    async def _inference(request: Request, path: str) -> Response:
        body, payload = await read_json_body(request, settings.max_body_bytes)
        alias = check_inference(path, payload, settings.allow_unknown_fields)
        request.scope[MODEL_SCOPE_KEY] = alias  # the metrics middleware labels the request with it
        user = payload.get("user")
        affinity = request.headers.get(SESSION_HEADER) or (user if isinstance(user, str) and user else None)
        return await state["forwarder"].forward(path, body, alias, affinity)

    app.include_router(inference_routes(_inference))

    # Installed after the inference routes, so that those are the first routes matched against a request.
    install_error_handlers(app)
    install_router_metrics(app, metrics, lambda: state["manager"])  # /metrics, /manager/metrics, /sd/*
    install_guard(app, auth, "router", router_policy, settings.max_body_bytes)  # keys checked before anything

    # ------------------------------------------------------------------ models

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        table: RouteTable = state["table"]
        if not table.loaded:
            await state["sync"].refresh()
        return {
            "object": "list",
            "data": [
                {
                    "id": alias,
                    "object": "model",
                    "created": route.created,
                    "owned_by": "serverless-vllm",
                    "state": route.state.value,
                }
                for alias, route in sorted(table.aliases().items())
            ],
        }

    @app.post("/v1/models/register")
    async def register_model(spec: ModelSpec) -> JSONResponse:
        info = await manager().register_model(spec)
        await state["sync"].refresh()
        return JSONResponse(_retrieve_shape(info))

    @app.get("/v1/models/{alias}")
    async def get_model(alias: Alias) -> JSONResponse:
        return JSONResponse(_retrieve_shape(await manager().get_model(alias)))

    @app.patch("/v1/models/{alias}")
    async def patch_model(alias: Alias, patch: ModelPatch) -> JSONResponse:
        return JSONResponse(_retrieve_shape(await manager().patch_model(alias, patch)))

    @app.delete("/v1/models/{alias}")
    async def delete_model(alias: Alias) -> dict[str, Any]:
        await manager().delete_model(alias)
        await state["sync"].refresh()
        return {"id": alias, "object": "model", "deleted": True}

    # ------------------------------------------------------------------ fleet

    @app.get("/health")
    async def health() -> dict[str, Any]:
        table: RouteTable = state["table"]
        return {
            "status": "ok",
            "router_id": settings.router_id,
            "routing_epoch": table.epoch,
            "routing_version": table.version,
            "routing_loaded": table.loaded,
            "models": len(table.aliases()),
        }

    @app.get("/workers")
    async def workers() -> list[WorkerInfo]:
        return await manager().list_workers()

    # Worker-facing calls pass through, so a worker's MANAGER_URL may point at the router.
    @app.post("/workers/register")
    async def register_worker(reg: WorkerRegistration) -> HeartbeatReply:
        return await manager().register_worker(reg)

    @app.post("/workers/heartbeat")
    async def heartbeat(hb: Heartbeat) -> HeartbeatReply:
        return await manager().heartbeat(hb)

    return app


def app_from_env() -> FastAPI:
    """Factory for gunicorn (`svllm router --workers N`): each process builds its own table from the env."""
    from ..manager.http_client import HTTPManagerClient

    settings = RouterSettings.from_env()
    headers = AuthSettings.from_env().admin_headers()  # the router's credential to the manager
    return create_router_app(settings, lambda: HTTPManagerClient(settings.manager_url, headers=headers))
