"""Keeps the router's key ring in step with the manager's key table (long-poll, beside the routing table's): a
key created or revoked reaches every router as soon as the manager has it (well within 2 s)."""

from __future__ import annotations

import asyncio
import logging

from ..aio import stop_tasks
from ..manager.protocol import ManagerAPI
from ..security.keys import KeyRing
from .limits import TENANT, Limiter

log = logging.getLogger(__name__)

LONG_POLL_S = 25.0
# Least time between two loads of the key table: a burst of changes (keys made by a script) costs a router a few
# loads (the whole table each, about 40-90 ms of CPU with 10,000 keys) instead of one per change, and a
# revocation still arrives well within 2 s.
MIN_RELOAD_GAP_S = 0.25


class KeySync:
    def __init__(self, manager: ManagerAPI, ring: KeyRing, limiter: Limiter) -> None:
        self._manager = manager
        self._ring = ring
        self._limiter = limiter
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the manager is not up yet: the poll retries
            log.warning("key table not loaded yet: %s", exc)
        self._task = asyncio.create_task(self._poll(), name="key-poll")

    async def stop(self) -> None:
        await stop_tasks(self._task)

    async def refresh(self, timeout: float = 0.0) -> bool:
        """Load the key table if the manager has a newer one (after up to `timeout` s); True if it did."""
        ring = self._ring
        table = await self._manager.wait_keys(ring.version, ring.epoch, timeout)
        if table.base is not None and table.epoch == ring.epoch and table.version <= ring.version:
            return False  # changes this ring has already (another refresh applied them meanwhile)
        if table.base is not None and (table.epoch != ring.epoch or table.base > ring.version):
            table = await self._manager.wait_keys(-1, "", 0.0)  # changes since a version this ring lacks: all
        if table.version != ring.version or table.epoch != ring.epoch:
            self._ring.update(table)
            tenants = self._ring.tenants()
            self._limiter.forget(
                lambda name: self._ring.by_id(name) is not None or name.removeprefix(TENANT) in tenants
            )
            return True
        return False

    async def _poll(self) -> None:
        delay = 0.5
        while True:
            try:
                if await self.refresh(LONG_POLL_S):
                    await asyncio.sleep(MIN_RELOAD_GAP_S)
                delay = 0.5
            except Exception as exc:
                # The manager is away: keep checking keys against the table we have, and retry.
                log.warning("key table long-poll failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
