"""The router's key API (admin key only; passed on to the manager): create, list, show, update and revoke keys,
and set or list the limits a tenant's keys share. `GET /v1/usage`: every key's usage for the admin key, its own
for a key made at run time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from ..errors import APIError
from ..manager.protocol import ManagerAPI
from ..schemas import KeyCreated, KeyInfo, KeyLimits, KeyPatch, KeySpec
from ..schemas.keys import NAME_PATTERN
from ..security.auth import ADMIN_ONLY, Authenticator, bearer_token
from ..security.keys import KEY_SCOPE, ActiveKey

KeyRef = Annotated[str, Path(max_length=128, description="the key's id or name")]
TenantName = Annotated[str, Path(pattern=NAME_PATTERN)]


def keys_router(
    manager: Callable[[], ManagerAPI],
    refresh: Callable[[], Awaitable[None]],
    usage: Callable[[str, str], Awaitable[list[dict[str, Any]]]],
    authenticator: Callable[[], Authenticator | None],
    tenants: Callable[[], dict[str, KeyLimits]],
) -> APIRouter:
    """`refresh`: bring this router's key ring up to date (after a change made through it: no wait for the poll);
    `usage`: the usage rows of one key or one tenant ("": all), summed over every router;
    `tenants`: the tenants' limits from the key table this router has."""
    routes = APIRouter()

    @routes.post("/v1/keys")
    async def create_key(spec: KeySpec) -> KeyCreated:
        created = await manager().create_key(spec)
        await refresh()
        return created

    @routes.get("/v1/keys")
    async def list_keys() -> dict[str, Any]:
        return {"object": "list", "data": [k.model_dump(mode="json") for k in await manager().list_keys()]}

    @routes.get("/v1/keys/{ref}")
    async def get_key(ref: KeyRef) -> KeyInfo:
        return await manager().get_key(ref)

    @routes.patch("/v1/keys/{ref}")
    async def update_key(ref: KeyRef, patch: KeyPatch) -> KeyInfo:
        updated = await manager().update_key(ref, patch)
        await refresh()
        return updated

    @routes.delete("/v1/keys/{ref}")
    async def revoke_key(ref: KeyRef) -> KeyInfo:
        revoked = await manager().revoke_key(ref)
        await refresh()
        return revoked

    @routes.put("/v1/tenants/{tenant}")
    async def set_tenant_limits(tenant: TenantName, limits: KeyLimits) -> dict[str, Any]:
        shared = await manager().set_tenant_limits(tenant, limits)
        await refresh()
        return {"tenant": tenant, "limits": shared.model_dump(mode="json")}

    @routes.get("/v1/tenants")
    async def list_tenants() -> dict[str, Any]:
        data = [{"tenant": t, "limits": v.model_dump(mode="json")} for t, v in sorted(tenants().items())]
        return {"object": "list", "data": data}

    @routes.get("/v1/usage")
    async def get_usage(
        request: Request,
        tenant: Annotated[str | None, Query(max_length=64)] = None,
        key: Annotated[str | None, Query(max_length=128, description="one key's id or name")] = None,
    ) -> dict[str, Any]:
        caller = request.scope.get(KEY_SCOPE)
        if isinstance(caller, ActiveKey):  # a key reads its own usage
            if tenant is not None or key not in (None, caller.id, caller.name):
                raise APIError(
                    403, "a key reads its own usage only (the admin key reads any key's or tenant's)", "forbidden"
                )
            return {"object": "list", "data": await usage(caller.id, "")}
        auth = authenticator()
        if auth is not None and auth.enabled and not auth.allowed(bearer_token(request.scope), ADMIN_ONLY):
            raise APIError(
                403, "usage is kept for keys made with /v1/keys: ask with such a key or the admin key", "forbidden"
            )
        key_id = (await manager().get_key(key)).id if key else ""  # a name is the key's too; unknown: 404
        return {"object": "list", "data": await usage(key_id, tenant or "")}

    return routes
