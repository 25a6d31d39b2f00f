"""API keys in the manager's SQLite database (the registry's file, a table of its own): each key's record with
the SHA-256 of its secret, never the secret."""

from __future__ import annotations

import threading

from ..schemas import KeyEntry, KeyLimits
from .store import open_db


class KeyStore:
    def __init__(self, path: str) -> None:
        # Its own connection (WAL lets it share the file with the model store); writes are rare and tiny.
        self._db = open_db(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, record TEXT NOT NULL, created_at REAL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS tenant_limits (tenant TEXT PRIMARY KEY, limits TEXT NOT NULL)")

    def load(self) -> list[KeyEntry]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM api_keys ORDER BY created_at").fetchall()
        return [KeyEntry.model_validate_json(record) for (record,) in rows]

    def save(self, entry: KeyEntry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (id, record, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                (entry.id, entry.model_dump_json(), entry.created_at),
            )

    def load_tenants(self) -> dict[str, KeyLimits]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, limits FROM tenant_limits").fetchall()
        return {tenant: KeyLimits.model_validate_json(limits) for tenant, limits in rows}

    def save_tenant(self, tenant: str, limits: KeyLimits) -> None:
        """Limits without any value: the tenant's row goes."""
        with self._lock:
            if limits.limited():
                self._db.execute(
                    "INSERT INTO tenant_limits (tenant, limits) VALUES (?, ?)"
                    " ON CONFLICT(tenant) DO UPDATE SET limits = excluded.limits",
                    (tenant, limits.model_dump_json()),
                )
            else:
                self._db.execute("DELETE FROM tenant_limits WHERE tenant = ?", (tenant,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
