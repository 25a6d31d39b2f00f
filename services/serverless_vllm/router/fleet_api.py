"""The router's fleet API: its health, the workers and the whole fleet's status (from the manager), and the
worker-facing calls passed through to the manager, so a worker's MANAGER_URL may point at the router."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from ..schemas import FleetStatus, Heartbeat, HeartbeatReply, WorkerInfo, WorkerRegistration
from .state import RouterState


def fleet_router(state: Callable[[], RouterState], router_id: str) -> APIRouter:
    """GET /health, GET /workers, GET /status, POST /workers/register, POST /workers/heartbeat. `state`: the
    router's started state (AppState.get)."""
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> dict[str, Any]:
        table = state().table
        return {
            "status": "ok",
            "router_id": router_id,
            "routing_epoch": table.epoch,
            "routing_version": table.version,
            "routing_loaded": table.loaded,
            "models": len(table.aliases()),
        }

    @routes.get("/workers")
    async def workers() -> list[WorkerInfo]:
        return await state().manager.list_workers()

    @routes.get("/status")
    async def status() -> FleetStatus:
        """Every model (state, target, replicas) and every worker in one answer, for `svllm status`."""
        manager = state().manager
        models, workers = await asyncio.gather(manager.list_models(), manager.list_workers())
        return FleetStatus(models=models, workers=workers)

    @routes.post("/workers/register")
    async def register_worker(reg: WorkerRegistration) -> HeartbeatReply:
        return await state().manager.register_worker(reg)

    @routes.post("/workers/heartbeat")
    async def heartbeat(hb: Heartbeat) -> HeartbeatReply:
        return await state().manager.heartbeat(hb)

    return routes
