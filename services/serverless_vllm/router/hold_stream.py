"""A streaming request held through a cold start: SSE comments while it waits, then the model's own events.

A request for a model with no ready replica waits at the router (Forwarder.hold). A streaming one (`"stream": true`
to an endpoint that streams) still waiting after HOLD_KEEPALIVE_INTERVAL gets its response started: `200
text/event-stream` and a comment line (`: loading model 'x', 12 s`), then another every interval while it is held,
so that a proxy with an idle timeout does not cut it and the user sees the wait. SSE clients skip comments (the
`openai` and `anthropic` SDKs, EventSource): the first event they see is the model's, relayed into the same response
once a replica is picked. What would have been an error status had the response not started (the hold timed out,
the model failed or was deleted, the replicas failed before answering, the replica answered an error) is one error
event in the endpoint's error shape instead, and the stream ends.

A hold that ends within the first interval (a model that was nearly ready, any refusal) answers as any request does,
with its own status. Nothing here runs for a model with a ready replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..dataplane.body import InferenceRequest
from ..dataplane.endpoints import ErrorShape
from ..dataplane.relay import RelayResponse
from ..errors import APIError
from ..schemas import Endpoint
from .policy import RequestKey

if TYPE_CHECKING:
    from .proxy import Forwarder, Tried

log = logging.getLogger(__name__)


def keeps_alive(request: InferenceRequest) -> bool:
    """Whether the answer to `request` is an event stream, which comments can keep alive while it is held."""
    return request.endpoint.streams and request.payload.get("stream") is True


def replicas_failed(alias: str) -> APIError:
    return APIError(502, f"the replicas of '{alias}' failed before answering; try again", "upstream_error")


async def hold_streaming(
    forwarder: Forwarder,
    request: InferenceRequest,
    affinity: RequestKey | None,
    served_by: Callable[[Endpoint], None] | None,
    tried: Tried,
    retries: int,
) -> Endpoint | Response:
    """Hold a streaming request for a replica. Within the keep-alive interval: the replica (or the hold's error,
    raised), as Forwarder.hold gives them. After it: the started stream, which goes on holding, then relays
    (`retries`: how many more replicas it may try if one fails before answering)."""
    held_since = time.monotonic()
    hold = asyncio.ensure_future(forwarder.hold(request.alias, tried, affinity, request.endpoint))
    try:
        await asyncio.wait((hold,), timeout=forwarder.keepalive_s)
    except BaseException:  # cancelled: the client left (dataplane/disconnect.py); the hold gives its place back
        hold.cancel()
        raise
    if hold.done():
        return hold.result()
    return HeldStream(forwarder, request, affinity, served_by, tried, retries, hold, held_since)


class HeldStream(StreamingResponse):
    """The started response of a held streaming request: comments while it is held, then the replica's stream."""

    def __init__(
        self,
        forwarder: Forwarder,
        request: InferenceRequest,
        affinity: RequestKey | None,
        served_by: Callable[[Endpoint], None] | None,
        tried: Tried,
        retries: int,
        hold: asyncio.Future[Endpoint],
        held_since: float,
    ) -> None:
        self._forwarder = forwarder
        self._request = request
        self._affinity = affinity
        self._served_by = served_by
        self._tried = tried
        self._retries = retries
        self._hold = hold
        self._held_since = held_since
        self._upstream: Response | None = None
        # no-cache and no proxy buffering (nginx): each comment must reach the client as it is written.
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__(self._events(), media_type="text/event-stream", headers=headers)

    async def _events(self) -> AsyncIterator[bytes]:
        request, alias = self._request, self._request.alias
        endpoint: Endpoint | None = None
        try:
            while True:
                if endpoint is None:
                    while not self._hold.done():
                        yield self._comment()
                        await asyncio.wait((self._hold,), timeout=self._forwarder.keepalive_s)
                    endpoint = self._hold.result()
                response = await self._forwarder.send_request(request, endpoint, self._affinity, self._tried)
                if response is not None:
                    if self._served_by is not None:
                        self._served_by(endpoint)
                    self._upstream = response
                    async for chunk in _relay(response):
                        yield chunk
                    return
                if self._tried.failed(endpoint):  # one other replica, as Forwarder
                    if self._retries <= 0:
                        raise replicas_failed(alias)
                    self._retries -= 1
                endpoint = self._forwarder.table.pick(alias, frozenset(self._tried), self._affinity)
                if endpoint is None:
                    self._hold = asyncio.ensure_future(
                        self._forwarder.hold(alias, self._tried, self._affinity, request.endpoint)
                    )
        except APIError as exc:
            yield self._error(exc)
        except Exception as exc:
            log.exception("held stream of %s failed", alias)
            yield self._error(APIError(500, f"internal error: {type(exc).__name__}", "internal_error"))
        finally:
            self._release()

    def _comment(self) -> bytes:
        alias = self._request.alias
        line = f": loading model '{alias}', {time.monotonic() - self._held_since:.0f} s"
        ready_in = self._forwarder.table.ready_in(alias)
        if ready_in is not None:
            line += f", ready in about {math.ceil(ready_in)} s"
        return f"{line}\n\n".encode()

    def _error(self, exc: APIError) -> bytes:
        """The error as the endpoint's clients read it in a stream: an `error` event for Anthropic's, a data event
        with the `error` object for OpenAI's (the SDK raises it)."""
        if self._request.endpoint.errors is ErrorShape.ANTHROPIC:
            return b"event: error\ndata: " + json.dumps(exc.anthropic_body()).encode() + b"\n\n"
        return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"

    def _release(self) -> None:
        """Once, whichever way the stream ended (finished, cut, the client gone): the hold gives its queue place
        back, the upstream response its connection and its in-flight count."""
        hold = self._hold
        if not hold.done():
            hold.cancel()
        elif not hold.cancelled():
            hold.exception()  # retrieved: no "exception never retrieved" for a hold that failed unseen
        upstream, self._upstream = self._upstream, None
        if isinstance(upstream, RelayResponse):
            upstream.close_upstream()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _relay(response: Response) -> AsyncIterator[bytes]:
    """A replica's answer into a started event stream: its events as they come, or its error as an error event."""
    if isinstance(response, StreamingResponse):
        async for chunk in response.body_iterator:
            yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)
    elif response.status_code >= 400:
        raise APIError.from_response(response.status_code, bytes(response.body))
    else:  # a whole answer where a stream was asked for: one event
        yield b"data: " + bytes(response.body) + b"\n\n"
