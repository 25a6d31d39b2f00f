"""The manager as a detached Ray actor: a thin adapter over ManagerCore, method for method."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, cast

import ray

from ..config import AuthSettings, ManagerSettings
from ..manager.core import ManagerCore
from ..manager.protocol import ManagerService
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
from . import package_logging

log = logging.getLogger(__name__)

# Enough for every router replica's long-poll plus worker heartbeats and API calls at once.
MAX_CONCURRENCY = 100


class ManagerActor:
    """Async actor. Ray re-runs the constructor after a crash: registrations reload from SQLite and the new
    core gets a new epoch; workers re-register on their next heartbeat."""

    def __init__(self, settings: ManagerSettings, auth: AuthSettings) -> None:
        package_logging()
        # The constructor cannot start asyncio tasks, so the reconcile loop starts on the first call.
        # Credentials come from the deploying command, not this process's env (the raylet's, not the operator's).
        self._core = ManagerCore(settings, worker_headers=auth.worker_headers())
        log.info("manager actor up (pid %d, epoch %s, db %s)", os.getpid(), self._core.epoch, settings.db_path)

    async def _started(self) -> ManagerCore:
        await self._core.start()  # idempotent
        return self._core

    # ------------------------------------------------------------------ operations

    async def health(self) -> dict[str, Any]:
        return (await self._started()).health()

    def pid(self) -> int:
        return os.getpid()

    def settings(self) -> ManagerSettings:
        return self._core.settings

    # ------------------------------------------------------------------ ManagerService

    async def register_model(self, spec: ModelSpec) -> ModelInfo:
        return await (await self._started()).register_model(spec)

    async def patch_model(self, alias: str, patch: ModelPatch) -> ModelInfo:
        return await (await self._started()).patch_model(alias, patch)

    async def get_model(self, alias: str) -> ModelInfo:
        return (await self._started()).model_info(alias)

    async def list_models(self) -> list[ModelInfo]:
        return (await self._started()).list_models()

    async def delete_model(self, alias: str) -> None:
        await (await self._started()).delete_model(alias)

    async def register_worker(self, reg: WorkerRegistration) -> HeartbeatReply:
        return await (await self._started()).register_worker(reg)

    async def heartbeat(self, hb: Heartbeat) -> HeartbeatReply:
        return await (await self._started()).heartbeat(hb)

    async def list_workers(self) -> list[WorkerInfo]:
        return (await self._started()).list_workers()

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        return await (await self._started()).wait_routing(after_version, epoch, timeout)

    async def report_demand(self, report: DemandReport) -> None:
        await (await self._started()).report_demand(report)

    async def metrics_text(self) -> bytes:
        return await (await self._started()).metrics_text()

    async def create_key(self, spec: KeySpec) -> KeyCreated:
        return (await self._started()).keys.create(spec)

    async def list_keys(self) -> list[KeyInfo]:
        return (await self._started()).keys.all()

    async def get_key(self, ref: str) -> KeyInfo:
        return (await self._started()).keys.get(ref)

    async def update_key(self, ref: str, patch: KeyPatch) -> KeyInfo:
        return (await self._started()).keys.update(ref, patch)

    async def revoke_key(self, ref: str) -> KeyInfo:
        return (await self._started()).keys.revoke(ref)

    async def set_tenant_limits(self, ref: str, limits: KeyLimits) -> KeyLimits:
        return (await self._started()).keys.set_tenant_limits(ref, limits)

    async def wait_keys(self, after_version: int, epoch: str, timeout: float) -> KeyTable:
        return await (await self._started()).keys.wait(after_version, epoch, timeout)

    async def report_usage(self, report: UsageReport) -> None:
        (await self._started()).usage.apply(report)

    async def usage(self, key_id: str, tenant: str) -> list[UsageRow]:
        return (await self._started()).usage.rows(key_id, tenant)


def get_or_create_manager(
    settings: ManagerSettings, auth: AuthSettings, name: str, namespace: str, pin_to_head: bool = True
) -> ray.actor.ActorHandle[ManagerActor]:
    """The named detached manager actor: created once, reused by every later `svllm ray-services`."""
    options: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_concurrency": MAX_CONCURRENCY,
        # Restart forever on failure; calls in flight fail (the router turns that into a 503) rather than
        # being replayed against the new core.
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,  # I/O-bound: must not take a CPU slot from real work
    }
    if pin_to_head:
        # The SQLite registry lives on the head node's disk: a restart must come back there.
        options["resources"] = {"node:__internal_head__": 0.001}
    actor_class: Any = ray.remote(ManagerActor)  # typed by Ray as a handle or the class, by overload
    return cast("ray.actor.ActorHandle[ManagerActor]", actor_class.options(**options).remote(settings, auth))


if TYPE_CHECKING:  # mypy checks the actor against the protocol (tests/unit/test_manager_protocol.py at run time)
    _conforms: type[ManagerService] = ManagerActor
