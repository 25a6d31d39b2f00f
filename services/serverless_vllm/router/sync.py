"""Keeps the router's table in step with the manager (long-poll) and reports load back (off the hot path)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..aio import stop_tasks, wait_event
from ..errors import APIError
from ..manager.protocol import ManagerAPI
from ..schemas import DemandReport, Endpoint
from .table import RouteTable

log = logging.getLogger(__name__)

LONG_POLL_S = 25.0


class ManagerSync:
    def __init__(self, manager: ManagerAPI, table: RouteTable, router_id: str, report_interval_s: float) -> None:
        self._manager = manager
        self._table = table
        self._router_id = router_id
        self._interval = report_interval_s
        self._nudge = asyncio.Event()
        self._failed: list[Endpoint] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._reported_load = False

    async def start(self) -> None:
        with contextlib.suppress(APIError):
            await self.refresh()
        self._tasks = [
            asyncio.create_task(self._poll(), name="routing-poll"),
            asyncio.create_task(self._report(), name="demand-report"),
        ]

    async def stop(self) -> None:
        await stop_tasks(*self._tasks)

    async def refresh(self) -> None:
        self._table.update(await self._manager.wait_routing(-1, "", 0.0))

    def nudge(self) -> None:
        """Send a demand report now (a request started waiting, or an upstream refused)."""
        self._nudge.set()

    def upstream_failed(self, endpoint: Endpoint) -> None:
        self._failed.append(endpoint)
        self.nudge()

    async def _poll(self) -> None:
        delay = 0.5
        while True:
            try:
                table = await self._manager.wait_routing(self._table.version, self._table.epoch, LONG_POLL_S)
                if table.epoch != self._table.epoch or table.version != self._table.version:
                    self._table.update(table)
                delay = 0.5
            except Exception as exc:
                # The manager is away: keep serving from the table we have, and retry.
                log.warning("routing long-poll failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _report(self) -> None:
        while True:
            await wait_event(self._nudge, self._interval)
            self._nudge.clear()
            report = self._table.demand(self._router_id)
            failed, self._failed = self._failed, []
            if failed:
                report = DemandReport(
                    router_id=report.router_id, models=report.models, wake=report.wake, failed_endpoints=failed
                )
            # A report of no load is sent once, so the manager learns the load went to zero.
            if not report.models and not report.wake and not failed and not self._reported_load:
                continue
            self._reported_load = bool(report.models or report.wake)
            try:
                await self._manager.report_demand(report)
            except Exception as exc:
                log.warning("demand report failed: %s", exc)
