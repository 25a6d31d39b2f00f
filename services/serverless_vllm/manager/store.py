"""Durable model registrations in SQLite, with what each model's starts took: they survive manager restarts;
worker state is rebuilt live."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from ..schemas import ModelSpec, StartTimes


def open_db(path: str) -> sqlite3.Connection:
    """A connection to the manager's database file (made if missing), in WAL mode: the stores of one file (models
    here, keys in key_store.py) each hold one, guarded by a lock of their own."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    return db


class ModelStore:
    def __init__(self, path: str) -> None:
        # One connection guarded by a lock: writes are rare and tiny, and the manager is one process.
        self._db = open_db(path)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS models ("
                " alias TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS start_times (alias TEXT PRIMARY KEY, times TEXT NOT NULL)")

    def load(self) -> list[tuple[str, str, float]]:
        """(alias, the spec as stored (JSON), created_at) in registration order: validated by the registry, which
        refuses what no longer passes."""
        with self._lock:
            rows = self._db.execute("SELECT alias, spec, created_at FROM models ORDER BY created_at").fetchall()
        return [(alias, spec, created) for alias, spec, created in rows]

    def save(self, spec: ModelSpec, created_at: float | None = None) -> float:
        created = created_at if created_at is not None else time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO models (alias, spec, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT(alias) DO UPDATE SET spec = excluded.spec",
                (spec.alias, spec.model_dump_json(), created),
            )
        return created

    def load_start_times(self) -> dict[str, StartTimes]:
        with self._lock:
            rows = self._db.execute("SELECT alias, times FROM start_times").fetchall()
        return {alias: StartTimes.model_validate_json(times) for alias, times in rows}

    def save_start_times(self, alias: str, times: StartTimes) -> None:
        """One small write per engine start or wake."""
        with self._lock:
            self._db.execute(
                "INSERT INTO start_times (alias, times) VALUES (?, ?)"
                " ON CONFLICT(alias) DO UPDATE SET times = excluded.times",
                (alias, times.model_dump_json()),
            )

    def delete(self, alias: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM models WHERE alias = ?", (alias,))
            self._db.execute("DELETE FROM start_times WHERE alias = ?", (alias,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
