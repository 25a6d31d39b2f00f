"""Stateful Responses: a stored response lives in the memory of the engine that made it (vLLM keeps it there), so
`GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel` and a request with `previous_response_id` must reach
that replica.

The router remembers which replica answered each response id (bounded: RESPONSES_MAX_IDS ids, each kept
RESPONSES_RETENTION seconds after it was last used, least recently used first out). That map is a cache, not the
truth: an id it does not know (another router process made it, this router restarted, it aged out) is looked for
on the ready replicas themselves (a GET to each, at most RESPONSES_PROBE_REPLICAS of them), and a replica that is
gone takes its responses with it: `404` in the OpenAI shape.

A response belongs to whoever made it: a key made at run time reaches only its own (another's, or one made with an
environment key, is `404` as an unknown id would be). The map knows who made the responses this router process
made; one it found on a replica has no known maker, and a key reaches it only if the key may use its model (ids are
128 random bits: this bounds what a leaked id gives away). Environment keys and the admin key reach every response.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.responses import Response, StreamingResponse

from ..dataplane.body import InferenceRequest
from ..dataplane.relay import RelayResponse
from ..errors import APIError
from ..schemas import Endpoint, ModelTask
from ..security.keys import ActiveKey
from .policy import RequestKey
from .proxy import Forwarder
from .table import RouteTable

_ID_RE = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
_WATCH_BYTES = 65536  # the id is in the first event (response.created); look no further than this


# Who made a response: a key's id, ENVIRONMENT (an environment key, the admin key, or credentials off), or None: not
# known (found on a replica).
ENVIRONMENT = ""


@dataclass(slots=True)
class Held:
    alias: str
    replica_id: str
    used_at: float
    owner: str | None = None

    def visible_to(self, viewer: ActiveKey | None) -> bool:
        """Whether `viewer` (a key made at run time; None: the operator's keys) may reach this response."""
        if viewer is None:
            return True
        if self.owner is None:
            return viewer.allows(self.alias)
        return self.owner == viewer.id


class ResponseMap:
    """Response id -> the replica that holds it; bounded in count and age."""

    def __init__(self, max_ids: int, retention_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ids: OrderedDict[str, Held] = OrderedDict()
        self._max = max_ids
        self._retention = retention_s
        self._clock = clock

    def remember(self, response_id: str, alias: str, replica_id: str, owner: str | None = None) -> None:
        self._ids[response_id] = Held(alias, replica_id, self._clock(), owner)
        self._ids.move_to_end(response_id)
        while len(self._ids) > self._max:
            self._ids.popitem(last=False)

    def held(self, response_id: str) -> Held | None:
        """What is known of a response id (its use now counted), or None."""
        held = self._ids.get(response_id)
        if held is None:
            return None
        now = self._clock()
        if now - held.used_at > self._retention:
            del self._ids[response_id]
            return None
        held.used_at = now
        self._ids.move_to_end(response_id)
        return held

    def __len__(self) -> int:
        return len(self._ids)


def _not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"Response '{response_id[:200]}' not found: unknown, expired, or its replica is no longer running",
        "response_not_found",
    )


class ResponsesRouter:
    """Sends stored-response requests to the replica that holds the response, and learns where new ones land."""

    def __init__(self, forwarder: Forwarder, table: RouteTable, ids: ResponseMap, probe_replicas: int) -> None:
        self._forwarder = forwarder
        self._table = table
        self._ids = ids
        self._probe_limit = probe_replicas

    async def create(
        self, request: InferenceRequest, affinity: RequestKey | None, viewer: ActiveKey | None = None
    ) -> Response:
        """POST /v1/responses: to the holder of `previous_response_id` if any, else like any request. `viewer`: the
        key made at run time that asks (None: an environment key), which then owns the response."""
        owner = viewer.id if viewer is not None else ENVIRONMENT
        previous = request.payload.get("previous_response_id")
        if isinstance(previous, str):
            endpoint = await self._holder(previous, [request.alias], viewer)
            if endpoint.replica_id not in self._ready_ids(request.alias):
                raise _not_found(previous)
            response = await self._forwarder.send(
                request.endpoint.path, request.body, request.content_type, request.alias, endpoint
            )
            if response is None:
                raise _not_found(previous)  # the replica failed: what it held is gone with it
            return self._learn(response, request.alias, [endpoint], owner)
        # Filled when a replica answers: at once, or later for a stream started while held (router/hold_stream.py).
        served: list[Endpoint] = []
        response = await self._forwarder.forward(request, affinity, served.append)
        return self._learn(response, request.alias, served, owner)

    async def follow(self, response_id: str, action: str, query: str = "", viewer: ActiveKey | None = None) -> Response:
        """GET /v1/responses/{id} (its query, e.g. `stream=true`, passed on) or POST /v1/responses/{id}/cancel, at
        the replica that holds it."""
        endpoint, alias = await self._holder_of_any(response_id, viewer)
        path = f"/v1/responses/{quote(response_id, safe='')}" + ("/cancel" if action == "cancel" else "")
        path += f"?{query}" if query else ""
        method = "GET" if action == "get" else "POST"
        response = await self._forwarder.send(path, b"", "application/json", alias, endpoint, method)
        if response is None:
            raise _not_found(response_id)
        return response

    # ------------------------------------------------------------------ where a response is

    def _ready_ids(self, alias: str) -> set[str]:
        route = self._table.route(alias)
        return {e.replica_id for e in route.endpoints} if route is not None else set()

    def _endpoint(self, alias: str, replica_id: str) -> Endpoint | None:
        route = self._table.route(alias)
        return next((e for e in route.endpoints if e.replica_id == replica_id), None) if route else None

    async def _holder(self, response_id: str, aliases: Iterable[str], viewer: ActiveKey | None) -> Endpoint:
        return (await self._holder_among(response_id, list(aliases), viewer))[0]

    async def _holder_of_any(self, response_id: str, viewer: ActiveKey | None) -> tuple[Endpoint, str]:
        generating = [
            a
            for a, r in self._table.aliases().items()
            if r.task is ModelTask.GENERATE and r.endpoints and (viewer is None or viewer.allows(a))
        ]
        return await self._holder_among(response_id, generating, viewer)

    async def _holder_among(
        self, response_id: str, aliases: list[str], viewer: ActiveKey | None
    ) -> tuple[Endpoint, str]:
        """The replica that holds a response `viewer` may reach (known here, or else found among `aliases`)."""
        held = self._ids.held(response_id)
        if held is not None:
            endpoint = self._endpoint(held.alias, held.replica_id) if held.visible_to(viewer) else None
            if endpoint is None:
                raise _not_found(response_id)
            return endpoint, held.alias
        found = await self._probe(response_id, aliases)
        if found is None:
            raise _not_found(response_id)
        return found

    async def _probe(self, response_id: str, aliases: list[str]) -> tuple[Endpoint, str] | None:
        """Ask the ready replicas of `aliases` (at most the probe limit) whether they hold the response."""
        candidates = [(e, a) for a in aliases if (r := self._table.route(a)) for e in r.endpoints][: self._probe_limit]
        path = f"/v1/responses/{quote(response_id, safe='')}"

        async def holds(endpoint: Endpoint, alias: str) -> bool:
            response = await self._forwarder.send(path, b"", "application/json", alias, endpoint, "GET")
            if isinstance(response, RelayResponse):
                response.close_upstream()  # never streamed without ?stream=true; closed all the same
            return response is not None and response.status_code == 200

        answers = await asyncio.gather(*(holds(e, a) for e, a in candidates))
        for (endpoint, alias), held in zip(candidates, answers, strict=True):
            if held:
                self._ids.remember(response_id, alias, endpoint.replica_id)
                return endpoint, alias
        return None

    # ------------------------------------------------------------------ learning new ids

    def _learn(self, response: Response, alias: str, served: list[Endpoint], owner: str) -> Response:
        """Remember which replica (the last of `served`) holds the response id that `response` carries, and whose
        it is."""
        if response.status_code != 200:
            return response
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._watch(response.body_iterator, alias, served, owner)
            return response
        match = _ID_RE.search(bytes(response.body[:_WATCH_BYTES]))
        if match is not None:
            self._ids.remember(match.group(1).decode(), alias, served[-1].replica_id, owner)
        return response

    async def _watch(
        self, chunks: AsyncIterable[Any], alias: str, served: list[Endpoint], owner: str
    ) -> AsyncIterator[Any]:
        seen, watching = b"", True
        async for chunk in chunks:
            if watching:
                seen += chunk if isinstance(chunk, bytes) else str(chunk).encode()
                match = _ID_RE.search(seen)
                if match is not None and served:
                    self._ids.remember(match.group(1).decode(), alias, served[-1].replica_id, owner)
                watching = match is None and len(seen) <= _WATCH_BYTES
            yield chunk
