"""The router's model admin API: list, register, get, patch and delete models (passed on to the manager)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from ..schemas import ALIAS_PATTERN, ModelInfo, ModelPatch, ModelSpec, failure_reason
from ..security.keys import KEY_SCOPE, ActiveKey, hidden_model
from .state import RouterState

# A path alias that cannot be registered is a clear 400, never a manager call.
Alias = Annotated[str, Path(pattern=ALIAS_PATTERN)]


def _retrieve_shape(info: ModelInfo) -> dict[str, Any]:
    """GET /v1/models/{alias}: our model state, plus the fields of OpenAI's model object so clients parse it."""
    return {
        "id": info.alias,
        "object": "model",
        "created": int(info.created_at),
        "owned_by": "serverless-vllm",
        **info.model_dump(mode="json"),
        "task": info.engine.task.value,  # also under engine: at the top, as in the list
    }


# What a key made at run time (a tenant's) is shown of a model: what a client needs to use it and to wait for it. The
# fleet's side (where it runs, its engine's arguments and log lines, its weights' path) is the operator's.
_TENANT_FIELDS = ("id", "object", "created", "owned_by", "state", "phase", "expected_ready_s", "task", "base")


def _tenant_shape(info: ModelInfo) -> dict[str, Any]:
    shape = _retrieve_shape(info)
    return {**{name: shape[name] for name in _TENANT_FIELDS}, "last_error": failure_reason(info.last_error)}


def models_router(state: Callable[[], RouterState]) -> APIRouter:
    """GET /v1/models (from the local table), POST /v1/models/register, GET/PATCH/DELETE /v1/models/{alias}.
    `state`: the router's started state (AppState.get)."""
    routes = APIRouter()

    @routes.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        s = state()
        key = request.scope.get(KEY_SCOPE)  # a key made at run time sees its own models only
        if not s.table.loaded:
            await s.sync.refresh()
        return {
            "object": "list",
            "data": [
                {
                    "id": alias,
                    "object": "model",
                    "created": route.created,
                    "owned_by": "serverless-vllm",
                    "state": route.state.value,
                    "task": route.task.value,
                    **({"parent": route.parent} if route.parent is not None else {}),  # a LoRA adapter's base
                }
                for alias, route in sorted(s.table.aliases().items())
                if not isinstance(key, ActiveKey) or key.allows(alias)
            ],
        }

    @routes.post("/v1/models/register")
    async def register_model(spec: ModelSpec) -> JSONResponse:
        s = state()
        info = await s.manager.register_model(spec)
        await s.sync.refresh()
        return JSONResponse(_retrieve_shape(info))

    @routes.get("/v1/models/{alias}")
    async def get_model(alias: Alias, request: Request) -> JSONResponse:
        key = request.scope.get(KEY_SCOPE)
        if not isinstance(key, ActiveKey):  # an environment key, the admin key, or credentials off
            return JSONResponse(_retrieve_shape(await state().manager.get_model(alias)))
        if not key.allows(alias):  # as if it did not exist (docs/tenants.md)
            raise hidden_model(alias)
        return JSONResponse(_tenant_shape(await state().manager.get_model(alias)))

    @routes.patch("/v1/models/{alias}")
    async def patch_model(alias: Alias, patch: ModelPatch) -> JSONResponse:
        return JSONResponse(_retrieve_shape(await state().manager.patch_model(alias, patch)))

    @routes.delete("/v1/models/{alias}")
    async def delete_model(alias: Alias, cascade: bool = False) -> dict[str, Any]:
        s = state()
        if cascade:  # its LoRA adapters first (the manager refuses to delete a base that has some: 409)
            await s.sync.refresh()
            for adapter in sorted(a for a, route in s.table.aliases().items() if route.parent == alias):
                await s.manager.delete_model(adapter)
        await s.manager.delete_model(alias)
        await s.sync.refresh()
        return {"id": alias, "object": "model", "deleted": True}

    return routes
