"""ManagerAPI over HTTP, for routers in plain-HTTP mode. Where each call lives is protocol.HTTP_ROUTES."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from ..errors import APIError
from ..schemas import (
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
    Patch,
    RoutingTable,
    UsageReport,
    UsageRow,
    WorkerInfo,
    WorkerRegistration,
)
from .protocol import HTTP_ROUTES, ManagerAPI

T = TypeVar("T")


def _unreachable(exc: httpx.HTTPError) -> APIError:
    return APIError(503, f"manager unreachable: {type(exc).__name__}", "manager_unavailable", {"Retry-After": "2"})


class HTTPManagerClient:
    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        # Separate from the inference client: long-polls must not take connections from the hot path.
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers or {}, timeout=httpx.Timeout(10.0, read=75.0)
        )

    async def _send(
        self,
        call: str,
        *,
        alias: str = "",
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        ref: str = "",
    ) -> httpx.Response:
        route = HTTP_ROUTES[call]
        path = route.path.format(alias=quote(alias, safe=""), ref=quote(ref, safe=""))
        try:
            resp = await self._client.request(
                route.method,
                path,
                params=params,
                content=body.model_dump_json(exclude_unset=isinstance(body, Patch)) if body is not None else None,
                headers={"content-type": "application/json"} if body else None,
            )
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from exc
        if resp.status_code >= 400:
            raise APIError.from_response(resp.status_code, resp.content)
        return resp

    async def _call(
        self,
        call: str,
        result: type[T],
        *,
        alias: str = "",
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        ref: str = "",
    ) -> T:
        resp = await self._send(call, alias=alias, body=body, params=params, ref=ref)
        return TypeAdapter(result).validate_json(resp.content)

    async def register_model(self, spec: ModelSpec) -> ModelInfo:
        return await self._call("register_model", ModelInfo, body=spec)

    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo:
        return await self._call("patch_model", ModelInfo, alias=alias, body=patch)

    async def get_model(self, alias: str) -> ModelInfo:
        return await self._call("get_model", ModelInfo, alias=alias)

    async def list_models(self) -> list[ModelInfo]:
        return await self._call("list_models", list[ModelInfo])

    async def delete_model(self, alias: str) -> None:
        await self._send("delete_model", alias=alias)

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        return await self._call("register_worker", HeartbeatReply, body=reg)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        return await self._call("heartbeat", HeartbeatReply, body=hb)

    async def list_workers(self) -> list[WorkerInfo]:
        return await self._call("list_workers", list[WorkerInfo])

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        params = {"after": after_version, "epoch": epoch, "timeout": timeout}
        return await self._call("wait_routing", RoutingTable, params=params)

    async def report_demand(self, report: DemandReport) -> None:
        await self._send("report_demand", body=report)

    async def health(self) -> dict[str, Any]:
        return await self._call("health", dict[str, Any])

    async def metrics_text(self) -> bytes:
        return (await self._send("metrics_text")).content

    async def create_key(self, spec: KeySpec) -> KeyCreated:
        return await self._call("create_key", KeyCreated, body=spec)

    async def list_keys(self) -> list[KeyInfo]:
        return await self._call("list_keys", list[KeyInfo])

    async def get_key(self, ref: str) -> KeyInfo:
        return await self._call("get_key", KeyInfo, ref=ref)

    async def update_key(self, ref: str, patch: KeyPatch) -> KeyInfo:
        return await self._call("update_key", KeyInfo, ref=ref, body=patch)

    async def revoke_key(self, ref: str) -> KeyInfo:
        return await self._call("revoke_key", KeyInfo, ref=ref)

    async def set_tenant_limits(self, ref: str, limits: KeyLimits) -> KeyLimits:
        return await self._call("set_tenant_limits", KeyLimits, ref=ref, body=limits)

    async def report_usage(self, report: UsageReport) -> None:
        await self._send("report_usage", body=report)

    async def usage(self, key_id: str, tenant: str) -> list[UsageRow]:
        return await self._call("usage", list[UsageRow], params={"key_id": key_id, "tenant": tenant})

    async def wait_keys(self, after_version: int, epoch: str, timeout: float) -> KeyTable:
        params = {"after": after_version, "epoch": epoch, "timeout": timeout}
        return await self._call("wait_keys", KeyTable, params=params)

    async def close(self) -> None:
        await self._client.aclose()


if TYPE_CHECKING:  # mypy checks the client against the protocol (tests/unit/test_manager_protocol.py at run time)
    _conforms: type[ManagerAPI] = HTTPManagerClient
