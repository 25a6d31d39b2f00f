"""The inference routes of router and worker (dataplane/endpoints.py), served without FastAPI's per-request machinery.

FastAPI wraps every call in dependency solving, two AsyncExitStacks and a second exception wrapper. For an
endpoint that only takes the Request and returns a Response, none of that does anything, yet it was a large
share of the router's and the worker's CPU per request (bench/results/summary.md). A PlainRoute keeps what
FastAPI gives such a route at build time (the OpenAPI entry, method and path matching) and at request time
calls the endpoint directly; an exception still reaches the app's exception handlers, as from any route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from ..schemas import ALIAS_PATTERN
from ..security.inference import CHAT_OPENAPI, COMPLETION_OPENAPI
from .endpoints import ENDPOINTS, RESPONSE_CANCEL, RESPONSE_GET, BodyKind, InferenceEndpoint

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, InferenceEndpoint], Awaitable[Response]]
ResponseHandler = Callable[[Request, str, str], Awaitable[Response]]  # (request, response id, "get" | "cancel")


class PlainRoute(APIRoute):
    """Use as `APIRouter(route_class=PlainRoute)` for endpoints of the form `async def f(request) -> Response`.

    An inference route is bound to its handler and endpoint (`bound`): the handler is called with both directly,
    not through a closure per route (a coroutine frame less per request)."""

    bound: tuple[Handler, InferenceEndpoint] | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            await super().handle(scope, receive, send)  # the usual 405
            return
        if self.bound is not None:
            serve, inference = self.bound
            response = await serve(Request(scope, receive, send), inference)
        else:
            endpoint: Endpoint = self.endpoint
            response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def _openapi(endpoint: InferenceEndpoint) -> dict[str, Any]:
    """The request body as documented (and fuzzed): the full schema for chat and completions; for the others
    the `model` field (vLLM documents and validates the rest)."""
    if endpoint.family == "chat" and endpoint.path == "/v1/chat/completions":
        return CHAT_OPENAPI
    if endpoint.family == "completion":
        return COMPLETION_OPENAPI
    model = {"type": "string", "pattern": ALIAS_PATTERN, "description": "a registered alias"}
    if endpoint.body is BodyKind.MULTIPART:
        schema = {
            "type": "object",
            "required": ["model", "file"],
            "properties": {"model": model, "file": {"type": "string", "format": "binary"}},
        }
        content = {"multipart/form-data": {"schema": schema}}
    else:
        content = {
            "application/json": {"schema": {"type": "object", "required": ["model"], "properties": {"model": model}}}
        }
    return {"requestBody": {"required": True, "content": content}}


def inference_routes(handle: Handler, responses: ResponseHandler | None = None) -> APIRouter:
    """A POST route for every endpoint of dataplane/endpoints.py, documented with its request schema, served by
    `handle(request, endpoint)`; with `responses`, the routes that follow a stored response's id (`GET
    /v1/responses/{id}`, `POST .../cancel`) too."""
    routes = APIRouter(route_class=PlainRoute)
    for endpoint in ENDPOINTS:
        routes.add_api_route(
            endpoint.path,
            _bind(handle, endpoint),  # what FastAPI documents; requests are served through `bound`
            methods=["POST"],
            summary=endpoint.summary,
            name=endpoint.path.strip("/").replace("/", "_"),
            openapi_extra=_openapi(endpoint),
        )
        route = routes.routes[-1]
        assert isinstance(route, PlainRoute)
        route.bound = (handle, endpoint)
    if responses is not None:
        for path, action, method in ((RESPONSE_GET, "get", "GET"), (RESPONSE_CANCEL, "cancel", "POST")):
            routes.add_api_route(
                path, _bind_response(responses, action), methods=[method], summary=f"{action} a stored response"
            )
    return routes


def _bind(handle: Handler, endpoint: InferenceEndpoint) -> Endpoint:
    async def serve(request: Request) -> Response:
        return await handle(request, endpoint)

    return serve


def _bind_response(handle: ResponseHandler, action: str) -> Endpoint:
    async def serve(request: Request) -> Response:
        return await handle(request, request.path_params["response_id"], action)

    return serve
