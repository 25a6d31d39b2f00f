"""The manager as a plain HTTP service: a thin FastAPI adapter over ManagerCore."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Path, Query, Request, Response

from ..config import AuthSettings, ManagerSettings
from ..dataplane.heap import freeze_startup_heap
from ..errors import install_error_handlers
from ..metrics.manager import install_manager_metrics
from ..schemas import (
    ALIAS_PATTERN,
    DemandReport,
    Heartbeat,
    HeartbeatReply,
    KeyCreated,
    KeyInfo,
    KeyLimits,
    KeyPatch,
    KeySpec,
    KeyTable,
    ModelInfo,
    ModelPatch,
    ModelSpec,
    RoutingTable,
    UsageReport,
    UsageRow,
    WorkerInfo,
    WorkerRegistration,
)
from ..security.auth import install_guard, manager_policy
from .core import ManagerCore
from .protocol import HTTP_ROUTES

Alias = Annotated[str, Path(pattern=ALIAS_PATTERN)]
KeyRef = Annotated[str, Path(max_length=128)]  # a key's id or name
T = TypeVar("T")


async def _unless_gone(request: Request, call: Awaitable[T]) -> T | None:
    """`call`'s result, or None as soon as the client disconnects. A long-poll's router that stops closes its
    connection: the poll ends then, instead of holding the manager's own shutdown for its graceful timeout and
    being cancelled with a traceback (every Ctrl-C of `svllm up`)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, left = asyncio.ensure_future(call), asyncio.ensure_future(gone())
    try:
        await asyncio.wait((answer, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, left):
            task.cancel()
        await asyncio.gather(answer, left, return_exceptions=True)
    return answer.result() if answer.done() and not answer.cancelled() else None


def create_app(settings: ManagerSettings, core: ManagerCore | None = None, auth: AuthSettings | None = None) -> FastAPI:
    """`auth`: credentials (default: from the environment). The whole API needs the admin key (routers use it
    as their service credential) except worker registration and heartbeats (worker token) and health/metrics."""
    auth = auth or AuthSettings.from_env()
    core = core or ManagerCore(settings, worker_headers=auth.worker_headers())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await core.start()
        freeze_startup_heap()
        yield
        await core.close()

    app = FastAPI(title="serverless-vllm manager", lifespan=lifespan)
    app.state.core = core
    install_error_handlers(app)
    install_manager_metrics(app, core)  # /metrics, /sd/targets, /sd/workers
    install_guard(app, auth, "manager", manager_policy)

    def route(call: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """The route of one ManagerService call, at its place in HTTP_ROUTES (which the HTTP client reads too)."""
        where = HTTP_ROUTES[call]
        return app.api_route(where.path, methods=[where.method], name=call, **kwargs)

    @route("health")
    async def health() -> dict[str, Any]:
        return core.health()

    @route("register_worker")
    async def register_worker(reg: WorkerRegistration) -> HeartbeatReply:
        return await core.register_worker(reg)

    # worker id -> (reply, its JSON). The core hands out the same reply object until the worker's assignments
    # change, so each worker's reply is serialized once per change, not on every heartbeat (1,000 workers beat
    # every second); the bytes are what FastAPI would have written for the HeartbeatReply.
    encoded: dict[str, tuple[HeartbeatReply, bytes]] = {}

    @route("heartbeat", response_model=HeartbeatReply)
    async def heartbeat(hb: Heartbeat) -> Response:
        reply = await core.heartbeat(hb)
        if reply.reregister:  # unknown worker ids are not remembered
            return Response(reply.model_dump_json(), media_type="application/json")
        cached = encoded.get(hb.worker_id)
        if cached is None or cached[0] is not reply:
            cached = encoded[hb.worker_id] = (reply, reply.model_dump_json().encode())
        return Response(cached[1], media_type="application/json")

    @route("list_workers")
    async def workers() -> list[WorkerInfo]:
        return core.list_workers()

    @route("register_model")
    async def register_model(spec: ModelSpec) -> ModelInfo:
        return await core.register_model(spec)

    @route("list_models")
    async def list_models() -> list[ModelInfo]:
        return core.list_models()

    @route("get_model")
    async def get_model(alias: Alias) -> ModelInfo:
        return core.model_info(alias)

    @route("patch_model")
    async def patch_model(alias: Alias, patch: ModelPatch) -> ModelInfo:
        return await core.patch_model(alias, patch)

    @route("delete_model", status_code=204)
    async def delete_model(alias: Alias) -> Response:
        await core.delete_model(alias)
        return Response(status_code=204)

    # The last table served and its JSON: every router fetches each new version (about 0.8 MB and 6 ms to
    # serialize with 10,000 models), so it is serialized once per version, not once per router and poll.
    served: dict[str, tuple[RoutingTable, bytes]] = {}

    @route("wait_routing", response_model=RoutingTable)
    async def routing(
        request: Request,
        after: int = Query(-1, ge=-1),
        epoch: str = Query("", max_length=64),
        timeout: float = Query(0.0, ge=0.0, le=60.0),
    ) -> Response:
        table = await _unless_gone(request, core.wait_routing(after, epoch, timeout))
        if table is None:
            return Response(status_code=204)  # the router left (it is stopping): nobody reads this
        cached = served.get("table")
        if cached is None or cached[0] is not table:  # the core makes a new table object for each version
            cached = served["table"] = (table, table.model_dump_json().encode())
        return Response(cached[1], media_type="application/json")

    @route("create_key")
    async def create_key(spec: KeySpec) -> KeyCreated:
        return core.keys.create(spec)

    @route("list_keys")
    async def list_keys() -> list[KeyInfo]:
        return core.keys.all()

    @route("get_key")
    async def get_key(ref: KeyRef) -> KeyInfo:
        return core.keys.get(ref)

    @route("update_key")
    async def update_key(ref: KeyRef, patch: KeyPatch) -> KeyInfo:
        return core.keys.update(ref, patch)

    @route("revoke_key")
    async def revoke_key(ref: KeyRef) -> KeyInfo:
        return core.keys.revoke(ref)

    @route("set_tenant_limits")
    async def set_tenant_limits(ref: KeyRef, limits: KeyLimits) -> KeyLimits:
        return core.keys.set_tenant_limits(ref, limits)

    served_keys: dict[str, tuple[KeyTable, bytes]] = {}  # the last key table served and its JSON

    @route("wait_keys", response_model=KeyTable)
    async def key_table(
        request: Request,
        after: int = Query(-1, ge=-1),
        epoch: str = Query("", max_length=64),
        timeout: float = Query(0.0, ge=0.0, le=60.0),
    ) -> Response:
        table = await _unless_gone(request, core.keys.wait(after, epoch, timeout))
        if table is None:
            return Response(status_code=204)  # the router left
        if table.base is not None:  # the keys changed since the router's version: small, and its own
            return Response(table.model_dump_json().encode(), media_type="application/json")
        cached = served_keys.get("keys")  # the whole table, as the routing table: serialized once per version
        if cached is None or cached[0] is not table:
            cached = served_keys["keys"] = (table, table.model_dump_json().encode())
        return Response(cached[1], media_type="application/json")

    @route("report_demand", status_code=204)
    async def demand(report: DemandReport) -> Response:
        await core.report_demand(report)
        return Response(status_code=204)

    @route("report_usage", status_code=204)
    async def report_usage(report: UsageReport) -> Response:
        core.usage.apply(report)
        return Response(status_code=204)

    @route("usage")
    async def usage(key_id: str = Query("", max_length=128), tenant: str = Query("", max_length=64)) -> list[UsageRow]:
        return core.usage.rows(key_id, tenant)

    return app
