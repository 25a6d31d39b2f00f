"""Sends this router process's usage of keys to the manager, which sums every router's (manager/usage_ledger.py).

Every REPORT_INTERVAL seconds, and before `GET /v1/usage` answers (so that a client reads the requests it has just
made through this router), the increments since the last report go as a report numbered from 1 (several, of at
most MAX_ROWS_PER_REPORT rows each, when many keys were used). A report that fails is sent again as it is, under its
number, before any newer one: the manager applies each number once, so a report whose answer was lost is not
counted twice, and nothing counted here is lost while the manager is away. A report the manager refuses as it is
(a 4xx other than 408 and 429: a manager of another version, a body over its limit) would be refused again at every
try and hold back every report after it: it is dropped, logged with the manager's reason, and counted
(`svllm_router_usage_reports_dropped_total`), and the next ones go on.
At shutdown a last report is tried.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque

from ..aio import stop_tasks
from ..errors import APIError
from ..manager.protocol import ManagerAPI
from ..schemas import UsageReport
from .usage import UsageBook

log = logging.getLogger(__name__)

FINAL_REPORT_TIMEOUT_S = 5.0
# Rows (a key and a model each, ~200 bytes of JSON) per report: a second in which many keys were used makes a few
# reports, each well within the manager's request body limit (MAX_BODY_BYTES), rather than one it would refuse.
MAX_ROWS_PER_REPORT = 5000
# A refusal that may pass later: a timeout, or the manager asking to slow down.
_RETRYABLE_4XX = frozenset({408, 429})


class UsageReporter:
    def __init__(self, manager: ManagerAPI, book: UsageBook, router_id: str, interval_s: float) -> None:
        self._manager = manager
        self._book = book
        self._interval = interval_s
        self.reporter = f"{router_id}/{uuid.uuid4().hex[:12]}"  # this process, for as long as it runs
        self._seq = 0
        self._unsent: deque[UsageReport] = deque()  # reports the manager has not acknowledged, oldest first
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # reports the manager refused for good (and their rows with them)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="usage-report")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        try:
            await asyncio.wait_for(self.flush(), FINAL_REPORT_TIMEOUT_S)
        except Exception as exc:  # the manager is away: what was not reported is lost with this process
            log.warning("last usage report not sent: %s", exc)

    async def flush(self) -> None:
        """Send what was not reported yet (failed reports first); raises if the manager does not take one."""
        async with self._lock:
            await self._send_unsent()
            # Taken only once the manager has every earlier report (while it is away the counts wait in the book,
            # one row per key and model, not as a report per tick), and once per flush: requests counted while
            # these are sent go with the next (a flush that took them too would never end under traffic).
            rows = self._book.take_increments()
            for at in range(0, len(rows), MAX_ROWS_PER_REPORT):
                self._seq += 1
                chunk = rows[at : at + MAX_ROWS_PER_REPORT]
                self._unsent.append(UsageReport(reporter=self.reporter, seq=self._seq, rows=chunk))
            await self._send_unsent()

    async def _send_unsent(self) -> None:
        while self._unsent:
            report = self._unsent[0]
            try:
                await self._manager.report_usage(report)
            except APIError as exc:
                if not 400 <= exc.status < 500 or exc.status in _RETRYABLE_4XX:
                    raise  # the manager is away or failing: sent again, as it is
                self.dropped += 1
                log.error(
                    "usage report %s of %d rows refused by the manager, dropped (%d so far): %s %s",
                    report.seq,
                    len(report.rows),
                    self.dropped,
                    exc.status,
                    exc.message,
                )
            self._unsent.popleft()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception as exc:  # kept, and sent again at the next tick
                log.warning("usage report not taken by the manager (sent again): %s", exc)
