"""ManagerAPI over Ray remote calls: how the Serve router talks to the manager actor."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeVar, cast

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..errors import APIError
from ..manager.protocol import ManagerAPI
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
from . import DEFAULT_NAMESPACE, MANAGER_ACTOR_NAME

T = TypeVar("T")

log = logging.getLogger(__name__)

# Margin over a long-poll's own timeout before the call counts as lost.
_POLL_MARGIN_S = 10.0


def _unavailable(reason: str) -> APIError:
    return APIError(503, f"manager unavailable: {reason}", "manager_unavailable", {"Retry-After": "2"})


class RayManagerClient:
    """Calls the named manager actor; errors come back as APIError, exactly as over HTTP."""

    def __init__(
        self,
        name: str = MANAGER_ACTOR_NAME,
        namespace: str = DEFAULT_NAMESPACE,
        timeout_s: float = 30.0,
        handle: Any = None,
    ) -> None:
        self._name = name
        self._namespace = namespace
        self._timeout = timeout_s
        self._actor = handle

    async def _remote(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self._actor is None:
            try:
                # A GCS lookup: off the event loop, it may take a moment while the cluster is busy.
                self._actor = await asyncio.to_thread(ray.get_actor, self._name, namespace=self._namespace)
            except ValueError:
                raise _unavailable(f"no actor '{self._name}' in namespace '{self._namespace}'") from None
        actor = self._actor
        try:
            async with asyncio.timeout(timeout or self._timeout):
                return await getattr(actor, method).remote(*args)
        except RayTaskError as exc:
            # The core raised: an APIError (it pickles intact) is the manager's answer; anything else is a bug.
            if isinstance(exc.cause, APIError):
                raise APIError.from_dict(exc.cause.to_dict()) from None
            log.error("manager call %s failed: %s", method, exc)
            raise APIError(500, f"manager error: {type(exc.cause).__name__}", "manager_error") from None
        except RayActorError as exc:
            # Died (Ray restarts it) or unreachable for now: the caller retries; a fresh lookup finds the
            # actor again even if it was deleted and created anew.
            self._actor = None
            raise _unavailable(type(exc).__name__) from None
        except (TimeoutError, GetTimeoutError):
            raise _unavailable(f"no answer to {method} within {timeout or self._timeout:.0f} s") from None

    async def _call(self, result: type[T], method: str, *args: Any, timeout: float | None = None) -> T:
        """A call whose result is `result` (pickled by Ray as the actor returned it, so no validation is needed)."""
        return cast(T, await self._remote(method, *args, timeout=timeout))

    async def register_model(self, spec: ModelSpec) -> ModelInfo:
        return await self._call(ModelInfo, "register_model", spec)

    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo:
        return await self._call(ModelInfo, "patch_model", alias, patch)

    async def get_model(self, alias: str) -> ModelInfo:
        return await self._call(ModelInfo, "get_model", alias)

    async def list_models(self) -> list[ModelInfo]:
        return await self._call(list[ModelInfo], "list_models")

    async def delete_model(self, alias: str) -> None:
        await self._remote("delete_model", alias)

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        return await self._call(HeartbeatReply, "register_worker", reg)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        return await self._call(HeartbeatReply, "heartbeat", hb)

    async def list_workers(self) -> list[WorkerInfo]:
        return await self._call(list[WorkerInfo], "list_workers")

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        return await self._call(
            RoutingTable, "wait_routing", after_version, epoch, timeout, timeout=timeout + _POLL_MARGIN_S
        )

    async def report_demand(self, report: DemandReport) -> None:
        await self._remote("report_demand", report)

    async def health(self) -> dict[str, Any]:
        return await self._call(dict[str, Any], "health")

    async def metrics_text(self) -> bytes:
        return await self._call(bytes, "metrics_text")

    async def create_key(self, spec: KeySpec) -> KeyCreated:
        return await self._call(KeyCreated, "create_key", spec)

    async def list_keys(self) -> list[KeyInfo]:
        return await self._call(list[KeyInfo], "list_keys")

    async def get_key(self, ref: str) -> KeyInfo:
        return await self._call(KeyInfo, "get_key", ref)

    async def update_key(self, ref: str, patch: KeyPatch) -> KeyInfo:
        return await self._call(KeyInfo, "update_key", ref, patch)

    async def revoke_key(self, ref: str) -> KeyInfo:
        return await self._call(KeyInfo, "revoke_key", ref)

    async def set_tenant_limits(self, ref: str, limits: KeyLimits) -> KeyLimits:
        return await self._call(KeyLimits, "set_tenant_limits", ref, limits)

    async def wait_keys(self, after_version: int, epoch: str, timeout: float) -> KeyTable:
        return await self._call(KeyTable, "wait_keys", after_version, epoch, timeout, timeout=timeout + _POLL_MARGIN_S)

    async def report_usage(self, report: UsageReport) -> None:
        await self._remote("report_usage", report)

    async def usage(self, key_id: str, tenant: str) -> list[UsageRow]:
        return await self._call(list[UsageRow], "usage", key_id, tenant)

    async def close(self) -> None:
        # The actor belongs to the cluster, not to this router: just drop the handle.
        self._actor = None


if TYPE_CHECKING:  # mypy checks the client against the protocol (tests/unit/test_manager_protocol.py at run time)
    _conforms: type[ManagerAPI] = RayManagerClient
