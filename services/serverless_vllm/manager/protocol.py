"""The manager's API, written once.

`ManagerService` is what the manager serves; the Ray actor implements it method for method. `ManagerAPI` is how a
router (or a worker's registration, through a router) calls it: the HTTP client and the Ray client implement it.
`HTTP_ROUTES` says where each call lives in the manager's HTTP app, and the HTTP client and app both read it.

Two checks keep the four adapters in step: mypy (each adapter module assigns its class to `type[...]` of its
protocol, so a wrong signature is a type error in the test command), and `signature_differences`, which a unit test
runs over every adapter and the HTTP app's routes (tests/unit/test_manager_protocol.py).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Protocol

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
    RoutingTable,
    UsageReport,
    UsageRow,
    WorkerInfo,
    WorkerRegistration,
)


class ManagerService(Protocol):
    """The manager's calls, as the Ray actor serves them and the HTTP app routes them."""

    async def register_model(self, spec: ModelSpec) -> ModelInfo: ...
    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo: ...
    async def get_model(self, alias: str) -> ModelInfo: ...
    async def list_models(self) -> list[ModelInfo]: ...
    async def delete_model(self, alias: str) -> None: ...
    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply: ...
    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply: ...
    async def list_workers(self) -> list[WorkerInfo]: ...
    # Long-poll: returns once the table is newer than `after_version` (or from another epoch), or after `timeout`.
    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable: ...
    async def report_demand(self, report: DemandReport) -> None: ...
    async def health(self) -> dict[str, Any]: ...
    # The manager's metrics in Prometheus text format (relayed by the router at /manager/metrics).
    async def metrics_text(self) -> bytes: ...
    # API keys as data (manager/keys.py). `ref` is a key's id or its name; the secret is returned by create only.
    async def create_key(self, spec: KeySpec) -> KeyCreated: ...
    async def list_keys(self) -> list[KeyInfo]: ...
    async def get_key(self, ref: str) -> KeyInfo: ...
    async def update_key(self, ref: str, patch: KeyPatch) -> KeyInfo: ...
    async def revoke_key(self, ref: str) -> KeyInfo: ...
    # Limits shared by every key of a tenant (limits without values: none); the key table carries them.
    async def set_tenant_limits(self, ref: str, limits: KeyLimits) -> KeyLimits: ...
    # Long-poll, as wait_routing: the key table (hashes, limits) once newer than `after_version`.
    async def wait_keys(self, after_version: int, epoch: str, timeout: float) -> KeyTable: ...
    # Usage of keys (manager/usage_ledger.py): each router process reports what it counted since its last report;
    # `usage` sums every report, for one key (`key_id`), one tenant, or all ("" for either: no filter).
    async def report_usage(self, report: UsageReport) -> None: ...
    async def usage(self, key_id: str, tenant: str) -> list[UsageRow]: ...


class ManagerAPI(ManagerService, Protocol):
    """The manager as a router's client sees it: the service's calls, and closing the client."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class HTTPRoute:
    method: str
    path: str  # may hold "{alias}" or "{ref}", the call's argument of that name


HTTP_ROUTES: dict[str, HTTPRoute] = {
    "register_model": HTTPRoute("POST", "/models"),
    "patch_model": HTTPRoute("PATCH", "/models/{alias}"),
    "get_model": HTTPRoute("GET", "/models/{alias}"),
    "list_models": HTTPRoute("GET", "/models"),
    "delete_model": HTTPRoute("DELETE", "/models/{alias}"),
    "register_worker": HTTPRoute("POST", "/workers/register"),
    "heartbeat": HTTPRoute("POST", "/workers/heartbeat"),
    "list_workers": HTTPRoute("GET", "/workers"),
    "wait_routing": HTTPRoute("GET", "/routing"),
    "report_demand": HTTPRoute("POST", "/demand"),
    "health": HTTPRoute("GET", "/health"),
    "metrics_text": HTTPRoute("GET", "/metrics"),
    "create_key": HTTPRoute("POST", "/keys"),
    "list_keys": HTTPRoute("GET", "/keys"),
    "get_key": HTTPRoute("GET", "/keys/{ref}"),
    "update_key": HTTPRoute("PATCH", "/keys/{ref}"),
    "revoke_key": HTTPRoute("POST", "/keys/{ref}/revoke"),
    "wait_keys": HTTPRoute("GET", "/key-table"),
    "set_tenant_limits": HTTPRoute("PUT", "/tenants/{ref}"),
    "report_usage": HTTPRoute("POST", "/usage"),
    "usage": HTTPRoute("GET", "/usage"),
}


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    """The methods a protocol declares (its own and inherited), with their resolved signatures."""
    out: dict[str, inspect.Signature] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        for name, member in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(member):
                out[name] = _resolved_signature(member)
    return out


def signature_differences(implementation: type, protocol: type) -> list[str]:
    """How `implementation` departs from `protocol`: a missing method, or one whose parameters, their types, the
    return type or async-ness differ. Empty when it conforms."""
    problems = []
    for name, wanted in protocol_methods(protocol).items():
        member = getattr(implementation, name, None)
        if member is None or not inspect.isfunction(member):
            problems.append(f"{implementation.__name__}.{name}: missing")
            continue
        if not inspect.iscoroutinefunction(member):
            problems.append(f"{implementation.__name__}.{name}: not async")
        found = _resolved_signature(member)
        if found != wanted:
            problems.append(f"{implementation.__name__}.{name}{found} differs from {protocol.__name__}{wanted}")
    return problems


def _resolved_signature(function: Any) -> inspect.Signature:
    """The signature with its annotations resolved (the modules use postponed annotations) and `self` dropped; so is
    `_ray_trace_ctx`, which Ray adds to an actor class's methods in place once it has been made an actor in the
    process (tracing support), not part of the API."""
    hints = typing.get_type_hints(function)
    signature = inspect.signature(function)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name not in ("self", "_ray_trace_ctx")
    ]
    return signature.replace(parameters=params, return_annotation=hints.get("return", signature.return_annotation))
