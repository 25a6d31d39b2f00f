"""The inference data path shared by router and worker: one pooled client, and streaming pass-through.

Upstream bytes go to the client as they arrive, never re-encoded. A stream cut half-way ends with an
OpenAI-shaped error event and closes instead of hanging. A client that goes away closes the upstream
connection, which makes vLLM abort the request rather than keep generating for nobody.

The client is http1.Client, not httpx (which the control plane uses) nor aiohttp: on this path httpx took 40-50%
of the router's and the worker's CPU per request, and aiohttp still 5 times this client's (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse

from .http1 import Client, UpstreamError, UpstreamResponse

__all__ = ["RelayResponse", "UpstreamClient", "UpstreamError", "UpstreamResponse", "error_event"]

log = logging.getLogger(__name__)

# Passed on as they are (the body is not decoded, so its encoding goes with it).
_PASS_HEADERS = ("content-type", "cache-control", "content-encoding")


def error_event(message: str, code: str = "stream_interrupted") -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()


def passthrough_headers(resp: UpstreamResponse) -> dict[str, str]:
    return {k: v for k in _PASS_HEADERS if (v := resp.headers.get(k)) is not None}


def is_event_stream(resp: UpstreamResponse) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


class RelayResponse(StreamingResponse):
    """Relays an upstream event stream; `on_done` runs exactly once at the end."""

    def __init__(self, upstream: UpstreamResponse, on_done: Callable[[], None] | None = None) -> None:
        self._upstream = upstream
        self._on_done = on_done
        self._closed = False
        headers = passthrough_headers(upstream)
        headers.setdefault("cache-control", "no-cache")
        super().__init__(self._chunks(), status_code=upstream.status, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.chunks():
                yield chunk
        except UpstreamError as exc:
            log.warning("upstream stream interrupted: %s", exc)
            yield error_event(f"upstream stream interrupted ({exc})")

    @property
    def upstream(self) -> UpstreamResponse:
        return self._upstream

    def close_upstream(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._upstream.close()
        if self._on_done is not None:
            self._on_done()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close_upstream()


class UpstreamClient:
    """One pooled HTTP client per process for inference requests to workers (router) or engines (worker).

    `read_timeout_s`: the longest silence allowed between two reads of a response (None: no limit; the engine
    decides). Connecting is bounded by `connect_timeout_s`, so a dead host fails fast and can be retried."""

    def __init__(self, read_timeout_s: float | None = None, connect_timeout_s: float = 5.0) -> None:
        self._client = Client(read_timeout_s=read_timeout_s, connect_timeout_s=connect_timeout_s)

    async def open(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
    ) -> UpstreamResponse:
        """Send `body` (a POST unless told otherwise) and return once the response headers are in. Raises
        UpstreamError."""
        return await self._client.request(method, base_url, path, body, headers)

    async def respond(self, upstream: UpstreamResponse, on_done: Callable[[], None] | None = None) -> Response:
        """The client's response: an event stream is relayed chunk by chunk, anything else read whole first (so a
        failure before the end is still retryable: raises UpstreamError). `on_done` runs once, when it ends."""
        if is_event_stream(upstream):
            return RelayResponse(upstream, on_done=on_done)
        try:
            content = await upstream.read()
        finally:
            upstream.close()
            if on_done is not None:
                on_done()
        return Response(content=content, status_code=upstream.status, headers=passthrough_headers(upstream))

    async def close(self) -> None:
        self._client.close()
