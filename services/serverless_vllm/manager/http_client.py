"""ManagerAPI over HTTP, for routers in plain-HTTP mode."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from ..errors import APIError
from ..schemas import (
    DemandReport,
    Heartbeat,
    HeartbeatReply,
    ModelInfo,
    ModelPatch,
    ModelSpec,
    RoutingTable,
    WorkerInfo,
    WorkerRegistration,
)

T = TypeVar("T")


class HTTPManagerClient:
    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        # Separate from the inference client: long-polls must not take connections from the hot path.
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers or {}, timeout=httpx.Timeout(10.0, read=75.0)
        )

    async def _call(
        self,
        method: str,
        path: str,
        result: Any,
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        try:
            resp = await self._client.request(
                method,
                path,
                params=params,
                content=body.model_dump_json() if body is not None else None,
                headers={"content-type": "application/json"} if body else None,
            )
        except httpx.HTTPError as exc:
            raise APIError(
                503, f"manager unreachable: {type(exc).__name__}", "manager_unavailable", {"Retry-After": "2"}
            ) from exc
        if resp.status_code >= 400:
            raise APIError.from_response(resp.status_code, resp.content)
        if result is None:
            return None
        return TypeAdapter(result).validate_json(resp.content)

    async def register_model(self, spec: ModelSpec) -> ModelInfo:
        return await self._call("POST", "/models", ModelInfo, body=spec)

    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo:
        return await self._call("PATCH", f"/models/{quote(alias, safe='')}", ModelInfo, body=patch)

    async def get_model(self, alias: str) -> ModelInfo:
        return await self._call("GET", f"/models/{quote(alias, safe='')}", ModelInfo)

    async def list_models(self) -> list[ModelInfo]:
        return await self._call("GET", "/models", list[ModelInfo])

    async def delete_model(self, alias: str) -> None:
        await self._call("DELETE", f"/models/{quote(alias, safe='')}", None)

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        return await self._call("POST", "/workers/register", HeartbeatReply, body=reg)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        return await self._call("POST", "/workers/heartbeat", HeartbeatReply, body=hb)

    async def list_workers(self) -> list[WorkerInfo]:
        return await self._call("GET", "/workers", list[WorkerInfo])

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        return await self._call(
            "GET", "/routing", RoutingTable, params={"after": after_version, "epoch": epoch, "timeout": timeout}
        )

    async def report_demand(self, report: DemandReport) -> None:
        await self._call("POST", "/demand", None, body=report)

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/health", dict[str, Any])

    async def metrics_text(self) -> bytes:
        try:
            resp = await self._client.get("/metrics")
        except httpx.HTTPError as exc:
            raise APIError(503, f"manager unreachable: {type(exc).__name__}", "manager_unavailable") from exc
        if resp.status_code >= 400:
            raise APIError.from_response(resp.status_code, resp.content)
        return resp.content

    async def close(self) -> None:
        await self._client.aclose()
