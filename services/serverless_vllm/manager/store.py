"""Durable model registrations in SQLite: they survive manager restarts; worker state is rebuilt live."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from ..schemas import ModelSpec


class ModelStore:
    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: writes are rare and tiny, and the manager is one process.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS models ("
                " alias TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL)"
            )

    def load(self) -> list[tuple[ModelSpec, float]]:
        with self._lock:
            rows = self._db.execute("SELECT spec, created_at FROM models ORDER BY created_at").fetchall()
        return [(ModelSpec.model_validate(json.loads(spec)), created) for spec, created in rows]

    def save(self, spec: ModelSpec, created_at: float | None = None) -> float:
        created = created_at if created_at is not None else time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO models (alias, spec, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(alias) DO UPDATE SET spec = excluded.spec",
                (spec.alias, spec.model_dump_json(), created),
            )
        return created

    def delete(self, alias: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM models WHERE alias = ?", (alias,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
