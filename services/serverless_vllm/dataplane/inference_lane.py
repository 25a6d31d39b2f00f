"""The inference routes reached without Starlette's router and exception middleware.

Every request to an app passes the exception middleware (a closure and a wrapped `send` per request), FastAPI's
exit-stack middleware (an AsyncExitStack per request, for dependencies these routes do not have) and the router
(each route's path regex tried in turn, before the inference routes are found). For a POST to an inference path,
which is almost every request the router and the worker see, this middleware, the innermost of the app's own,
finds the route by its exact path in a dict and calls it; an exception the handler raises before answering is
answered by the app's handler for it (errors.py), as the exception middleware would. Anything else goes on to
the app as before. Measured with bench/hot_path.py (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .inference_routes import PlainRoute


class InferenceLane:
    def __init__(self, app: ASGIApp, routes: Mapping[str, PlainRoute], handlers: Mapping[Any, Any]) -> None:
        self.app = app
        self._routes = routes
        self._handlers = handlers  # the app's exception handlers (a live view: installed after this)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or route.bound is None or scope.get("root_path"):
            await self.app(scope, receive, send)  # anything else, and apps mounted under a prefix: the usual way
            return
        serve, endpoint = route.bound
        request = Request(scope, receive, send)
        try:
            response = await serve(request, endpoint)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # what no handler of the exception middleware takes: the server error middleware's (500)
            response = await handler(request, exc)
        await response(scope, receive, send)  # once answering, errors go on as from any route

    def _handler(self, exc: Exception) -> Any:
        # As Starlette looks one up (the exception's classes in order); `Exception` itself belongs to the server
        # error middleware, outside this one.
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = self._handlers.get(cls)
            if handler is not None:
                return handler
        return None


def install_inference_lane(app: FastAPI, routes: APIRouter) -> None:
    """Serve `routes`' inference POSTs through the lane. Call before adding any other middleware (the guard and
    the metrics middleware must stay outside it)."""
    lanes = {r.path: r for r in routes.routes if isinstance(r, PlainRoute) and r.bound is not None}
    app.add_middleware(InferenceLane, routes=lanes, handlers=app.exception_handlers)
