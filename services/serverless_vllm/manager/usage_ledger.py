"""Usage of keys made at run time, summed over every router process that reported it, in the manager's SQLite
file: what `GET /v1/usage` answers on any router, across router restarts and the manager's own.

Each router process sends what it counted since its previous report (router/usage_report.py), numbered from 1.
A report is applied once: a router whose report's answer was lost sends the same report again, and the manager,
which remembers the last number applied per reporter, ignores it. Reporters not heard from for a week are
forgotten (their usage stays; only the numbering is dropped).

Beside each key's rows, the sums per tenant and model under the tenant each request was counted for: the manager's
`svllm_usage_*_total` counters, exact over every router process, and never lower than before (a key moved to
another tenant takes its `GET /v1/usage` rows along, not its old tenant's counts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..schemas import USAGE_COUNTS, UsageReport, UsageRow
from .store import open_db

COUNTS = tuple(USAGE_COUNTS)
FORGET_REPORTERS_AFTER_S = 7 * 24 * 3600.0

_ADD = (
    "INSERT INTO key_usage (key_id, model, key_name, tenant, requests, prompt_tokens, completion_tokens, errors,"
    " throttled) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key_id, model) DO UPDATE SET"
    " key_name = excluded.key_name, tenant = excluded.tenant," + ",".join(f" {c} = {c} + excluded.{c}" for c in COUNTS)
)


_ADD_TENANT = (
    "INSERT INTO tenant_usage (tenant, model, requests, prompt_tokens, completion_tokens, errors, throttled)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(tenant, model) DO UPDATE SET"
    + ",".join(f" {c} = {c} + excluded.{c}" for c in COUNTS)
)
_SUMS = ", ".join(f"SUM({c})" for c in COUNTS)


class UsageLedger:
    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self._db = open_db(path)  # its own connection to the registry's file (WAL), as the key store's
        self._lock = threading.Lock()
        self._clock = clock
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS key_usage (key_id TEXT NOT NULL, model TEXT NOT NULL, key_name TEXT,"
                " tenant TEXT, requests INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, errors INTEGER,"
                " throttled INTEGER, PRIMARY KEY (key_id, model))"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS usage_reporters (reporter TEXT PRIMARY KEY, seq INTEGER, seen_at REAL)"
            )
            made = not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tenant_usage'").fetchone()
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS tenant_usage (tenant TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER,"
                " prompt_tokens INTEGER, completion_tokens INTEGER, errors INTEGER, throttled INTEGER,"
                " PRIMARY KEY (tenant, model))"
            )
            if made:  # a file from before the table: its sums start from the keys' rows as they are
                self._db.execute(
                    f"INSERT INTO tenant_usage SELECT tenant, model, {_SUMS} FROM key_usage GROUP BY tenant, model"
                )

    def apply(self, report: UsageReport) -> bool:
        """Add a report's rows, once; False if this reporter's report of that number (or a later one) was applied
        already."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seen = self._db.execute(
                    "SELECT seq FROM usage_reporters WHERE reporter = ?", (report.reporter,)
                ).fetchone()
                if seen is not None and seen[0] >= report.seq:
                    self._db.execute("ROLLBACK")
                    return False
                counts = [tuple(getattr(r, c) for c in COUNTS) for r in report.rows]
                self._db.executemany(
                    _ADD,
                    [(r.key_id, r.model, r.key_name, r.tenant, *n) for r, n in zip(report.rows, counts, strict=True)],
                )
                self._db.executemany(
                    _ADD_TENANT, [(r.tenant, r.model, *n) for r, n in zip(report.rows, counts, strict=True)]
                )
                self._db.execute(
                    "INSERT INTO usage_reporters (reporter, seq, seen_at) VALUES (?, ?, ?) ON CONFLICT(reporter)"
                    " DO UPDATE SET seq = excluded.seq, seen_at = excluded.seen_at",
                    (report.reporter, report.seq, now),
                )
                self._db.execute("DELETE FROM usage_reporters WHERE seen_at < ?", (now - FORGET_REPORTERS_AFTER_S,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def rows(self, key_id: str = "", tenant: str = "") -> list[UsageRow]:
        """Every key's usage per model, or one key's (`key_id`) or one tenant's."""
        where, args = [], []
        if key_id:
            where.append("key_id = ?")
            args.append(key_id)
        if tenant:
            where.append("tenant = ?")
            args.append(tenant)
        query = "SELECT key_id, model, key_name, tenant, " + ", ".join(COUNTS) + " FROM key_usage"
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            found = self._db.execute(query + " ORDER BY tenant, key_name, model", args).fetchall()
        return [
            UsageRow(key_id=k, model=m, key_name=n, tenant=t, **dict(zip(COUNTS, counts, strict=True)))
            for k, m, n, t, *counts in found
        ]

    def tenant_totals(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(tenant, model, counts in COUNTS' order) for every tenant and model with usage: the metrics."""
        with self._lock:
            found = self._db.execute(
                "SELECT tenant, model, " + ", ".join(COUNTS) + " FROM tenant_usage ORDER BY tenant, model"
            ).fetchall()
        return [(tenant, model, tuple(counts)) for tenant, model, *counts in found]

    def close(self) -> None:
        with self._lock:
            self._db.close()
