"""Forwarding one inference request: pick a replica (or hold while the model cold-starts), relay, retry once.

The hot path for a ready model is: table lookup, one pooled HTTP request to the worker, byte relay.
No manager call, no JSON re-encoding. A streaming request held long enough has its stream started with
keep-alive comments (hold_stream.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from starlette.responses import Response

from ..config import RouterSettings
from ..dataplane.body import InferenceRequest
from ..dataplane.endpoints import InferenceEndpoint
from ..dataplane.headers import ADAPTER_MOVED, REPLICA_HEADER, RETRY_HEADER
from ..dataplane.relay import UpstreamClient, UpstreamError
from ..errors import APIError
from ..manager.protocol import ManagerAPI
from ..schemas import Endpoint, ModelState
from .hold_stream import hold_streaming, keeps_alive, replicas_failed
from .migration import StreamMigration
from .negative_cache import NegativeCache
from .policy import RequestKey
from .sync import ManagerSync
from .table import RouteTable

log = logging.getLogger(__name__)


def _unavailable(message: str, code: str, retry_after: int = 5) -> APIError:
    return APIError(503, message, code, {"Retry-After": str(retry_after)})


# How many times one request may follow a LoRA adapter that moved off the replica it was sent to (see Tried).
MAX_ADAPTER_MOVES = 8


class Tried(set[str]):
    """The replicas a request was sent to that failed before answering: not tried again. One whose worker said
    the LoRA adapter asked for is not loaded in it (any more: unloaded for another between the pick and the
    request's arrival) is not one of them: the adapter may come back to it, so it is skipped only until the routing
    table changes (RouteTable.adapter_moved), and the request holds meanwhile, as for a cold start."""

    moved: str | None = None  # the replica whose worker just said so
    moves = 0

    def failed(self, endpoint: Endpoint) -> bool:
        """`endpoint` failed before answering: whether that used up a try (it is then not tried again)."""
        if self.moved == endpoint.replica_id and self.moves < MAX_ADAPTER_MOVES:
            self.moved = None
            self.moves += 1
            return False
        self.add(endpoint.replica_id)
        return True


class Forwarder:
    def __init__(
        self,
        settings: RouterSettings,
        table: RouteTable,
        sync: ManagerSync,
        manager: ManagerAPI,
        client: UpstreamClient,
        upstream_headers: dict[str, str] | None = None,
        on_hold: Callable[[str, float], None] | None = None,
        unknown_models: NegativeCache | None = None,
    ) -> None:
        self._settings = settings
        self._table = table
        self._sync = sync
        self._manager = manager
        self._client = client
        self._headers = upstream_headers or {}
        self._on_hold = on_hold  # told how long each request waited for a ready replica (metrics)
        # The manager's recent 404s (aliases it does not know), answered here again for a few seconds.
        self._unknown = unknown_models if unknown_models is not None else NegativeCache(settings.unknown_model_ttl_s)
        self.keepalive_s = settings.hold_keepalive_s  # a held stream's comment interval (0: none)
        self._migration = StreamMigration(self) if settings.stream_migration else None

    @property
    def table(self) -> RouteTable:
        return self._table

    async def forward(
        self,
        request: InferenceRequest,
        affinity: RequestKey | None = None,
        served_by: Callable[[Endpoint], None] | None = None,
    ) -> Response:
        """Forward to a ready replica (held through a cold start), retry once on another one if the first failed
        before answering. `served_by` is told which replica answered."""
        alias = request.alias
        self._check_task(alias, request.endpoint)
        self._shed_if_full(alias)
        tried = Tried()
        failures = 0
        while failures < 2:  # the first try, and one retry on another replica
            endpoint = self._table.pick(alias, frozenset(tried), affinity)
            if endpoint is None:
                if self.keepalive_s and keeps_alive(request):
                    held = await hold_streaming(self, request, affinity, served_by, tried, retries=1 - failures)
                    if isinstance(held, Response):
                        return held  # held past the interval: the stream has started, and relays what follows
                    endpoint = held
                else:
                    endpoint = await self.hold(alias, tried, affinity, request.endpoint)
            response = await self.send_request(request, endpoint, affinity, tried)
            if response is not None:
                if served_by is not None:
                    served_by(endpoint)
                return response
            failures += tried.failed(endpoint)
        raise replicas_failed(alias)

    def _check_task(self, alias: str, endpoint: InferenceEndpoint) -> None:
        """A model's task decides its endpoints (an embedding model has no chat): refused here with a message that
        says why, instead of the engine's own 404 or a hold that would start an engine for nothing."""
        route = self._table.route(alias)
        if route is not None and not endpoint.serves(route.task):
            raise APIError(
                400,
                f"model '{alias}' is registered with task '{route.task.value}' and does not serve {endpoint.path} "
                f"(that endpoint needs a model of task {' or '.join(sorted(t.value for t in endpoint.tasks))})",
                "unsupported_endpoint",
            )

    def _shed_if_full(self, alias: str) -> None:
        """Backpressure: every ready replica at its in-flight cap -> 503 now, instead of an engine queue that grows
        until every client times out."""
        cap = self._settings.max_in_flight_per_replica
        route = self._table.route(alias) if cap > 0 else None
        if route is not None and route.endpoints and self._table.in_flight(alias) >= cap * len(route.endpoints):
            raise _unavailable(
                f"'{alias}' is at capacity ({cap} requests in flight per replica); retry shortly", "overloaded", 1
            )

    async def send_request(
        self, request: InferenceRequest, endpoint: Endpoint, affinity: RequestKey | None, tried: Tried
    ) -> Response | None:
        """`send` for an inference request; a stream that can go on on another replica if its replica dies is
        relayed so (router/migration.py)."""
        if self._migration is not None and keeps_alive(request):  # streams only: nothing more for the others
            return await self._migration.send(request, endpoint, affinity, tried)
        body, content_type = request.body, request.content_type
        return await self.send(request.endpoint.path, body, content_type, request.alias, endpoint, tried=tried)

    async def send(
        self,
        path: str,
        body: bytes,
        content_type: str,
        alias: str,
        endpoint: Endpoint,
        method: str = "POST",
        tried: Tried | None = None,
    ) -> Response | None:
        """Send to one replica. None: it failed before any byte reached the client (retry is safe); `tried` is told
        when that was its LoRA adapter not being loaded there."""
        version = self._table.version
        self._table.started(alias, endpoint)
        released = False

        def done() -> None:
            nonlocal released
            if not released:
                released = True
                self._table.finished(alias, endpoint)

        headers = {"content-type": content_type, **self._headers, REPLICA_HEADER: endpoint.replica_id}
        try:
            upstream = await self._client.open(endpoint.url, path, body, headers, method)
        except UpstreamError as exc:
            done()
            log.warning("replica %s on %s unreachable: %s", endpoint.replica_id, endpoint.worker_id, exc)
            if exc.refused:
                self._sync.upstream_failed(endpoint)
            return None
        except BaseException:  # cancelled (the client left while the answer was awaited): the slot is free again
            done()
            raise
        if upstream.status == 503 and (retry := upstream.headers.get(RETRY_HEADER)):
            upstream.close()
            done()
            if retry == ADAPTER_MOVED:
                self._table.adapter_moved(alias, endpoint.replica_id, version)
                if tried is not None:
                    tried.moved = endpoint.replica_id
            return None
        if upstream.status == 401:
            # The worker refused the router's credential: an operator's mistake, not the client's key.
            upstream.close()
            done()
            log.error("worker %s refused the router's worker token (SVLLM_WORKER_TOKEN differs)", endpoint.worker_id)
            raise APIError(502, "the router is not authorized by the worker", "upstream_unauthorized")
        try:
            return await self._client.respond(upstream, on_done=done)
        except UpstreamError as exc:
            log.warning("replica %s %s", endpoint.replica_id, exc)
            return None

    async def hold(
        self, alias: str, tried: set[str], affinity: RequestKey | None, request_endpoint: InferenceEndpoint
    ) -> Endpoint:
        """No ready replica: wait (bounded queue, cold-start timeout) while the manager brings one up."""
        if self._table.route(alias) is None:
            # Unknown here: the registry decides (a fresh router, or a registration the table has not seen), unless
            # it said 404 a moment ago: a wrong name asked again and again costs one manager call per TTL.
            message = self._unknown.get(alias)
            if message is not None:
                raise APIError(404, message, "model_not_found")
            try:
                await self._manager.get_model(alias)  # raises 404 for aliases that are not registered
            except APIError as exc:
                if exc.status == 404 and exc.code == "model_not_found":
                    self._unknown.add(alias, exc.message)
                raise
            await self._sync.refresh()
            self._check_task(alias, request_endpoint)
            endpoint = self._table.pick(alias, frozenset(tried), affinity)
            if endpoint is not None:
                return endpoint
        if self._table.queue_depth(alias) >= self._settings.max_queue_per_model:
            raise _unavailable(f"too many requests are waiting for '{alias}' to start", "queue_full", 2)
        self._table.enqueue(alias)
        self._sync.nudge()
        held_since = time.monotonic()
        try:
            async with asyncio.timeout(self._settings.cold_start_timeout_s):
                while True:
                    route = self._table.route(alias)
                    if route is None:
                        raise APIError(404, f"The model '{alias}' does not exist", "model_not_found")
                    if route.state is ModelState.FAILED:
                        raise _unavailable(f"model '{alias}' failed to start: {route.error}", "model_failed", 30)
                    endpoint = self._table.pick(alias, frozenset(tried), affinity)
                    if endpoint is not None:
                        return endpoint
                    await self._table.wait_change()
        except TimeoutError:
            limit = self._settings.cold_start_timeout_s
            # When to try again: when the model is expected ready (the manager learns it from its past starts).
            ready_in = self._table.ready_in(alias)
            raise _unavailable(
                f"model '{alias}' did not become ready within {limit:.0f} s",
                "cold_start_timeout",
                math.ceil(ready_in) if ready_in is not None else 10,
            ) from None
        finally:
            self._table.dequeue(alias)
            if self._on_hold is not None:
                self._on_hold(alias, time.monotonic() - held_since)
