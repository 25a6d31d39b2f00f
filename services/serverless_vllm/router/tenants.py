"""The router's tenant front door as one object: the key ring the guard checks, the limiter, the usage book and
its reports to the manager, the gate requests of keys go through, the key table's long-poll and the key API's
routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from prometheus_client import Histogram

from ..config import RouterSettings
from ..errors import APIError
from ..manager.protocol import ManagerAPI
from ..schemas import Priority
from ..security.auth import Authenticator
from ..security.keys import KeyRing
from .fair_queue import FairQueue
from .key_sync import KeySync
from .keys_api import keys_router
from .limits import Limiter
from .table import RouteTable
from .tenant_gate import TenantGate
from .usage import UsageBook, UsageCollector
from .usage_report import UsageReporter

FAIR_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Tenants:
    def __init__(self, limit_share: float, model_label: Callable[[str], str]) -> None:
        self.ring = KeyRing(limit_share)
        self.limiter = Limiter()
        self.usage = UsageBook(model_label)
        self.gate = TenantGate(self.limiter, self.usage)
        self.collector = UsageCollector(
            self.usage,
            lambda: self.gate.fair.by_class() if self.gate.fair else {},
            lambda: self._reporter.dropped if self._reporter else 0,
        )
        self.queue_wait = Histogram(
            "svllm_router_fair_queue_wait_seconds",
            "Time requests of keys waited in the fair queue for a slot of their model (0: none), by priority class "
            "(this router; FAIR_QUEUE).",
            ["priority"],
            buckets=FAIR_WAIT_BUCKETS,
            registry=None,  # registered with the router's metrics (router/app.py)
        )
        # Every class from 0, so a dashboard shows the classes before their first wait.
        waits = {priority: self.queue_wait.labels(priority.value) for priority in Priority}
        self.gate.waited = lambda priority, seconds: waits[priority].observe(seconds)
        self.authenticator: Authenticator | None = None  # the guard's, once installed (for GET /v1/usage)
        self._sync: KeySync | None = None
        self._reporter: UsageReporter | None = None
        self._manager: ManagerAPI | None = None

    async def start(self, manager: ManagerAPI, table: RouteTable, settings: RouterSettings) -> None:
        self._manager = manager
        self._sync = KeySync(manager, self.ring, self.limiter)
        self.gate.table = table
        await self._sync.start()
        self._reporter = UsageReporter(manager, self.usage, settings.router_id, settings.report_interval_s)
        self._reporter.start()
        if settings.fair_queue != "off" and settings.max_in_flight_per_replica > 0:  # no cap: nothing to wait for
            fair = FairQueue(
                table, settings.max_in_flight_per_replica, settings.max_queue_per_model, settings.fair_queue == "fair"
            )
            table.on_finished = fair.fill
            fair.start()
            self.gate.fair = fair

    async def stop(self) -> None:
        if self._reporter is not None:
            await self._reporter.stop()
        if self._sync is not None:
            await self._sync.stop()
        if self.gate.fair is not None:
            await self.gate.fair.stop()

    async def refresh(self) -> None:
        if self._sync is not None:
            await self._sync.refresh()  # a change made through this router: loaded at once

    async def usage_rows(self, key_id: str = "", tenant: str = "") -> list[dict[str, Any]]:
        """`GET /v1/usage`: the usage every router reported to the manager, this one's brought up to date first."""
        if self._reporter is None or self._manager is None:  # credentials off: no key made at run time, no usage
            return []
        await self._reporter.flush()
        return [row.model_dump() for row in await self._manager.usage(key_id, tenant)]

    def manager(self) -> ManagerAPI:
        if self._manager is None:  # started only with credentials on (router/app.py)
            raise APIError(
                400,
                "keys made at run time need authentication on: this router checks no key (SVLLM_AUTH=off)",
                "keys_disabled",
            )
        return self._manager

    def routes(self) -> APIRouter:
        return keys_router(self.manager, self.refresh, self.usage_rows, lambda: self.authenticator, self.ring.tenants)
