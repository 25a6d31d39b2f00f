"""Streaming pass-through shared by router and worker.

Upstream bytes go to the client as they arrive, never re-encoded. A stream cut half-way ends with an
OpenAI-shaped error event and closes instead of hanging. A client that goes away closes the upstream
response, which makes vLLM abort the request rather than keep generating for nobody.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
from starlette.responses import Response, StreamingResponse

log = logging.getLogger(__name__)

_PASS_HEADERS = ("content-type", "cache-control")


def error_event(message: str, code: str = "stream_interrupted") -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()


def passthrough_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k in _PASS_HEADERS if (v := resp.headers.get(k)) is not None}


def is_event_stream(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


class RelayResponse(StreamingResponse):
    """Relays an upstream httpx response opened with stream=True; `on_done` runs exactly once at the end."""

    def __init__(self, upstream: httpx.Response, on_done: Callable[[], None] | None = None) -> None:
        self._upstream = upstream
        self._on_done = on_done
        self._closed = False
        headers = passthrough_headers(upstream)
        headers.setdefault("cache-control", "no-cache")
        super().__init__(self._chunks(), status_code=upstream.status_code, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("upstream stream interrupted: %s", type(exc).__name__)
            yield error_event(f"upstream stream interrupted ({type(exc).__name__})")

    async def close_upstream(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._upstream.aclose()
        if self._on_done is not None:
            self._on_done()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close_upstream()


def full_response(upstream: httpx.Response, content: bytes) -> Response:
    return Response(content=content, status_code=upstream.status_code, headers=passthrough_headers(upstream))
