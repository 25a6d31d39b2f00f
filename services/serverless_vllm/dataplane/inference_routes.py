"""The two inference routes of router and worker, declared once, and served without FastAPI's per-request machinery.

FastAPI wraps every call in dependency solving, two AsyncExitStacks and a second exception wrapper. For an
endpoint that only takes the Request and returns a Response, none of that does anything, yet it was a large
share of the router's and the worker's CPU per request (bench/results/summary.md). A PlainRoute keeps what
FastAPI gives such a route at build time (the OpenAPI entry, method and path matching) and at request time
calls the endpoint directly; an exception still reaches the app's exception handlers, as from any route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from ..security.inference import CHAT_OPENAPI, COMPLETION_OPENAPI

Endpoint = Callable[[Request], Awaitable[Response]]


class PlainRoute(APIRoute):
    """Use as `APIRouter(route_class=PlainRoute)` for endpoints of the form `async def f(request) -> Response`."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            await super().handle(scope, receive, send)  # the usual 405
            return
        endpoint: Endpoint = self.endpoint
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def inference_routes(handle: Callable[[Request, str], Awaitable[Response]]) -> APIRouter:
    """POST /v1/chat/completions and /v1/completions, documented with their request schemas; `handle(request,
    path)` serves both."""
    routes = APIRouter(route_class=PlainRoute)

    @routes.post("/v1/chat/completions", openapi_extra=CHAT_OPENAPI)
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "/v1/chat/completions")

    @routes.post("/v1/completions", openapi_extra=COMPLETION_OPENAPI)
    async def completions(request: Request) -> Response:
        return await handle(request, "/v1/completions")

    return routes
