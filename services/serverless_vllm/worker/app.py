"""The worker's HTTP API: inference forwarded to its engines, and the manager-facing engine control."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response

from ..config import WorkerSettings
from ..errors import APIError, install_error_handlers
from ..relay import RelayResponse, full_response, is_event_stream
from ..router.proxy import REPLICA_HEADER, RETRY_HEADER
from ..schemas import Assignment, EngineStatus
from .agent import WorkerAgent

log = logging.getLogger(__name__)


def _not_here(message: str) -> APIError:
    # Tells the router this replica cannot serve (gone, not ready): it may retry another one.
    return APIError(503, message, "replica_unavailable", {RETRY_HEADER: "1", "Retry-After": "1"})


def create_app(settings: WorkerSettings, agent: WorkerAgent | None = None) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # One pooled client for every request to every local engine.
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                   limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200))
        worker = agent or WorkerAgent(settings, engine_client=client)
        state.update(agent=worker, client=client)
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()
            await client.aclose()

    app = FastAPI(title="serverless-vllm worker", lifespan=lifespan)
    install_error_handlers(app)

    async def _inference(request: Request, path: str) -> Response:
        agent: WorkerAgent = state["agent"]
        body = await request.body()
        replica_id = request.headers.get(REPLICA_HEADER)
        alias = None
        if not replica_id:
            try:
                payload = json.loads(body)
                alias = payload.get("model") if isinstance(payload, dict) else None
            except ValueError:
                raise APIError(400, "request body is not valid JSON", "invalid_json") from None
        engine = agent.ready_engine(alias, replica_id)
        if engine is None:
            raise _not_here(f"no ready engine here for {replica_id or alias!r}")
        client: httpx.AsyncClient = state["client"]
        request_out = client.build_request("POST", f"{engine.base_url}{path}", content=body,
                                           headers={"content-type": "application/json"})
        try:
            upstream = await client.send(request_out, stream=True)
        except httpx.TransportError as exc:
            raise _not_here(f"engine {engine.replica_id} unreachable ({type(exc).__name__})") from None
        if is_event_stream(upstream):
            return RelayResponse(upstream)
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        return full_response(upstream, content)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _inference(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _inference(request, "/v1/completions")

    @app.put("/engines")
    async def put_engines(assignments: list[Assignment]) -> list[EngineStatus]:
        return await state["agent"].apply(assignments)

    @app.get("/engines")
    async def get_engines() -> list[EngineStatus]:
        return state["agent"].statuses()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        agent: WorkerAgent = state["agent"]
        return {"status": "ok", "worker_id": settings.worker_id, "registered": agent.registered,
                "gpus": len(agent.gpus), "engines": len(agent.engines)}

    return app
