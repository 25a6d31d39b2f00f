"""The inference data path shared by router and worker: one pooled client, and streaming pass-through.

Upstream bytes go to the client as they arrive, never re-encoded. A stream cut half-way ends with an
OpenAI-shaped error event and closes instead of hanging. A client that goes away closes the upstream
connection, which makes vLLM abort the request rather than keep generating for nobody.

The client is aiohttp, not httpx (which the control plane uses): on this path httpx alone took 40-50% of the
router's and the worker's CPU per request (py-spy, bench/results/summary.md), several times aiohttp's cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anyio
from starlette.responses import Response, StreamingResponse

log = logging.getLogger(__name__)

# Passed on as they are (the body is not decoded, so its encoding goes with it).
_PASS_HEADERS = ("content-type", "cache-control", "content-encoding")
# What a broken upstream raises: connection errors, cut payloads, read timeouts.
_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class UpstreamError(Exception):
    """Nothing reached the client: the upstream refused, vanished or failed before answering (a retry is safe).
    `refused`: the connection itself was refused, so the host or its server is gone."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def error_event(message: str, code: str = "stream_interrupted") -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()


def passthrough_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k in _PASS_HEADERS if (v := resp.headers.get(k)) is not None}


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


def close_upstream(resp: aiohttp.ClientResponse) -> None:
    """Done with a response: a fully read one gives its connection back to the pool, anything else closes it
    (for vLLM a closed connection aborts the request)."""
    if resp.content.at_eof():
        resp.release()
    else:
        resp.close()


class RelayResponse(StreamingResponse):
    """Relays an upstream event stream; `on_done` runs exactly once at the end."""

    def __init__(self, upstream: aiohttp.ClientResponse, on_done: Callable[[], None] | None = None) -> None:
        self._upstream = upstream
        self._on_done = on_done
        self._closed = False
        headers = passthrough_headers(upstream)
        headers.setdefault("cache-control", "no-cache")
        super().__init__(self._chunks(), status_code=upstream.status, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.content.iter_any():
                yield chunk
        except _UPSTREAM_ERRORS as exc:
            log.warning("upstream stream interrupted: %s", type(exc).__name__)
            yield error_event(f"upstream stream interrupted ({type(exc).__name__})")

    def close_upstream(self) -> None:
        if self._closed:
            return
        self._closed = True
        close_upstream(self._upstream)
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

    def __init__(self, read_timeout_s: float | None = None, connect_timeout_s: float = 5.0,
                 max_connections: int = 2000) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        # Made lazily: a session binds to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, keepalive_timeout=60.0)
            # No cookie jar: a relay must not carry state from one client to another. Bodies pass undecoded.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                                                  skip_auto_headers=("Accept-Encoding", "User-Agent"))
        return self._session

    async def open(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST `body` and return once the response headers are in. Raises UpstreamError."""
        try:
            return await self._open_session().post(url, data=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}", refused=True) from None
        except _UPSTREAM_ERRORS as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from None

    async def respond(self, upstream: aiohttp.ClientResponse,
                      on_done: Callable[[], None] | None = None) -> Response:
        """The client's response: an event stream is relayed chunk by chunk, anything else read whole first (so a
        failure before the end is still retryable: raises UpstreamError). `on_done` runs once, when it ends."""
        if is_event_stream(upstream):
            return RelayResponse(upstream, on_done=on_done)
        try:
            content = await upstream.read()
        except _UPSTREAM_ERRORS as exc:
            raise UpstreamError(f"failed mid-response ({type(exc).__name__})") from None
        finally:
            close_upstream(upstream)
            if on_done is not None:
                on_done()
        return Response(content=content, status_code=upstream.status, headers=passthrough_headers(upstream))

    async def close(self) -> None:
        if self._session is not None:
            with anyio.CancelScope(shield=True):
                await self._session.close()
            self._session = None
