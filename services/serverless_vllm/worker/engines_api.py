"""The worker's control API: the manager sets and reads its engines (PUT/GET /engines); GET /health."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from ..schemas import Assignment, EngineStatus
from .agent import WorkerAgent


def engines_router(agent: Callable[[], WorkerAgent], worker_id: str) -> APIRouter:
    """`agent`: the worker's started agent (from its AppState)."""
    routes = APIRouter()

    @routes.put("/engines")
    async def put_engines(assignments: list[Assignment]) -> list[EngineStatus]:
        return await agent().apply(assignments)

    @routes.get("/engines")
    async def get_engines() -> list[EngineStatus]:
        return agent().statuses()

    @routes.get("/health")
    async def health() -> dict[str, Any]:
        worker = agent()
        return {
            "status": "ok",
            "worker_id": worker_id,
            "registered": worker.registered,
            "gpus": len(worker.gpus),
            "engines": len(worker.engines),
        }

    return routes
