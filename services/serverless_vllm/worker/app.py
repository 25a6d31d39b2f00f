"""The worker's HTTP API: inference forwarded to its engines, and the manager-facing engine control."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request, Response

from ..config import AuthSettings, WorkerSettings
from ..dataplane.app_state import AppState
from ..dataplane.body import read_inference
from ..dataplane.disconnect import until_disconnect
from ..dataplane.endpoints import InferenceEndpoint
from ..dataplane.headers import ADAPTER_MOVED, DEFAULT_MAX_BODY_BYTES, REPLICA_HEADER, RETRY_HEADER
from ..dataplane.heap import freeze_startup_heap
from ..dataplane.inference_lane import install_inference_lane
from ..dataplane.inference_routes import inference_routes
from ..dataplane.relay import UpstreamClient, UpstreamError, UpstreamResponse, is_event_stream
from ..errors import APIError, install_error_handlers
from ..metrics.worker import install_worker_metrics
from ..security.auth import install_guard, worker_policy
from .agent import WorkerAgent
from .engine import EngineProcess
from .engine_errors import reshaped
from .engines_api import engines_router

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What the worker makes when it starts."""

    agent: WorkerAgent  # the desired-state loop and the engines it supervises
    client: httpx.AsyncClient  # control calls to the local engines (health, sleep, metrics)
    relay: UpstreamClient  # inference to the local engines


def _not_here(message: str, retry: str = "1") -> APIError:
    # Tells the router this replica cannot serve (gone, not ready; ADAPTER_MOVED: not with that adapter): it may
    # retry another one.
    return APIError(503, message, "replica_unavailable", {RETRY_HEADER: retry, "Retry-After": "1"})


def create_app(settings: WorkerSettings, agent: WorkerAgent | None = None, auth: AuthSettings | None = None) -> FastAPI:
    """`auth`: credentials (default: from the environment). Every route but health and metrics needs the worker
    token: /engines is the manager's, inference the router's; the worker presents it to the manager too."""
    state: AppState[WorkerState] = AppState("worker")
    auth = auth or AuthSettings.from_env()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Pooled clients to the local engines: `relay` for inference, `client` for control (health, sleep, metrics).
        # A read timeout: an engine that goes silent mid-answer frees the request (and the router may retry).
        relay = UpstreamClient(read_timeout_s=settings.engine_read_timeout_s or None)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        worker = agent or WorkerAgent(settings, engine_client=client, manager_headers=auth.worker_headers())
        state.set(WorkerState(agent=worker, client=client, relay=relay))
        await worker.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            await worker.stop()
            await client.aclose()
            await relay.close()

    app = FastAPI(title="serverless-vllm worker", lifespan=lifespan)
    app.state.leave = lambda: state.get().agent.leave()  # the worker's own shutdown: drain first (shutdown.py)

    async def _inference(request: Request, endpoint: InferenceEndpoint) -> Response:
        # The same checks as the router (unknown fields aside: the router decides those), so nothing malformed
        # reaches an engine even from a caller holding the worker token.
        inference = await read_inference(request, endpoint, DEFAULT_MAX_BODY_BYTES, allow_unknown_fields=True)
        replica_id = request.headers.get(REPLICA_HEADER)
        engine = _engine(None if replica_id else inference.alias, replica_id)
        # The router closing its connection (its client left) closes ours to the engine: vLLM aborts the request.
        body, content_type = inference.body, inference.content_type
        relayed = _relay(engine, endpoint.path, body, content_type, "POST", endpoint, inference.alias)
        return await until_disconnect(request, relayed)

    async def _stored_response(request: Request, response_id: str, action: str) -> Response:
        # A stored response is in one engine's memory: the router names it (it learnt where the response was made).
        replica_id = request.headers.get(REPLICA_HEADER)
        if not replica_id:
            raise APIError(400, f"{REPLICA_HEADER} is required for a stored response", "invalid_request")
        path = f"/v1/responses/{quote(response_id, safe='')}" + ("/cancel" if action == "cancel" else "")
        path += f"?{request.url.query}" if request.url.query else ""  # e.g. stream=true, starting_after=N
        engine = _engine(None, replica_id)
        return await _relay(engine, path, b"", "application/json", "GET" if action == "get" else "POST")

    def _engine(alias: str | None, replica_id: str | None) -> EngineProcess:
        engine = state.get().agent.ready_engine(alias, replica_id)
        if engine is None:
            raise _not_here(f"no ready engine here for {replica_id or alias!r}")
        return engine

    async def _relay(
        engine: EngineProcess,
        path: str,
        body: bytes,
        content_type: str,
        method: str,
        endpoint: InferenceEndpoint | None = None,
        model: str | None = None,
    ) -> Response:
        worker = state.get()
        relay = worker.relay
        # In flight from here to the answer's last byte: an engine leaving waits for it (drain.py). The count ends
        # once: in the relay's done-callback once the response owns it, else here.
        inflight, rid = worker.agent.inflight, engine.replica_id
        inflight.enter(rid)
        handed_off = False
        try:
            upstream = await relay.open(engine.base_url, path, body, {"content-type": content_type}, method)
            if upstream.status >= 400 and not is_event_stream(upstream):
                if upstream.status == 404 and endpoint is not None:
                    return await _route_missing(engine, endpoint, upstream, model)
                return _engine_error(upstream, await _read(upstream), path)
            handed_off = True
            return await relay.respond(upstream, on_done=lambda: inflight.leave(rid))
        except UpstreamError as exc:
            # Nothing reached the client (the engine died or refused): the router may retry elsewhere.
            raise _not_here(f"engine {engine.replica_id} failed before answering ({exc})") from None
        finally:
            if not handed_off:  # failed or cancelled (the client left) before the relay took the request
                inflight.leave(rid)

    async def _route_missing(
        engine: EngineProcess, endpoint: InferenceEndpoint, upstream: UpstreamResponse, model: str | None
    ) -> Response:
        """vLLM registers an endpoint only for models that support it (no transcription route for a text model):
        its route-level 404 means this model cannot serve the endpoint, which the client is told as such. Its 404
        for a model other than its own is a LoRA adapter it does not hold (unloaded for another after the router
        picked this replica): the router is told to look again (ADAPTER_MOVED), the client sees nothing of it."""
        content = await _read(upstream)
        if model is not None and model != engine.alias and content.strip() != b'{"detail":"Not Found"}':
            raise _not_here(f"adapter {model!r} is not loaded in engine {engine.replica_id}", ADAPTER_MOVED)
        if content.strip() == b'{"detail":"Not Found"}':
            task = engine.assignment.engine.task.value
            raise APIError(
                400,
                f"model '{engine.alias}' (task '{task}') does not serve {endpoint.path}: its engine has no such "
                "endpoint (the model does not support it)",
                "unsupported_endpoint",
            )
        return _engine_error(upstream, content, endpoint.path)

    async def _read(upstream: UpstreamResponse) -> bytes:
        try:
            return await upstream.read()
        finally:
            upstream.close()

    def _engine_error(upstream: UpstreamResponse, content: bytes, path: str) -> Response:
        """An engine's error answer, in the shape of the API on `path` (engine_errors.py)."""
        return Response(reshaped(upstream.status, content, path), upstream.status, media_type="application/json")

    routes = inference_routes(_inference, _stored_response)
    app.include_router(routes)
    install_inference_lane(app, routes)  # the innermost middleware: before the others are added

    # Installed after the inference routes, so that those are the first routes matched against a request.
    install_error_handlers(app)
    install_worker_metrics(app, lambda: state.get().agent, lambda: state.get().client)  # /metrics, engines' metrics
    install_guard(app, auth, "worker", worker_policy)

    app.include_router(engines_router(lambda: state.get().agent, settings.worker_id))  # /engines, /health
    return app
