"""A service freezes its startup heap (heap.py): what its startup built is out of the collector's scans."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serverless_vllm.config import AuthSettings, ManagerSettings
from serverless_vllm.manager.http_app import create_app


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()  # this test process's own heap, as other tests left it
    yield
    gc.unfreeze()


def test_the_manager_freezes_what_its_startup_built(tmp_path: Path, unfrozen: None) -> None:
    app = create_app(ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"]), auth=AuthSettings(mode="off"))
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        frozen = gc.get_freeze_count()
        tracked = {id(o) for o in gc.get_objects()}
        # The app, its routes and its core were built before the freeze: no collection scans them any more.
        assert frozen > 10_000, frozen
        assert id(app) not in tracked and id(app.router) not in tracked and id(app.state.core) not in tracked
        assert client.get("/health").status_code == 200
        # What serving allocates is collected as usual.
        fresh = [[]]
        assert any(o is fresh for o in gc.get_objects())
