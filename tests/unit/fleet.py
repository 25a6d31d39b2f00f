"""Small fixtures shared by the manager's unit tests: a settable clock, a GPU as NVML describes an H100, a running
ManagerCore."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from serverless_vllm.config import ManagerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import GPUInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gpu(index: int) -> GPUInfo:
    return GPUInfo(index=index, name="NVIDIA H100", uuid=f"GPU-{index}", memory_total_mb=81559, memory_free_mb=81000)


# Nothing listens on the discard port: pushes fail fast and heartbeat replies carry the assignments instead.
NOWHERE = "http://127.0.0.1:9"


@contextlib.asynccontextmanager
async def running_core(settings: ManagerSettings, clock: Clock | None = None) -> AsyncIterator[ManagerCore]:
    """A started ManagerCore on `settings` (and `clock`), closed on exit."""
    core = ManagerCore(settings, clock=clock) if clock is not None else ManagerCore(settings)
    await core.start()
    try:
        yield core
    finally:
        await core.close()


def core_settings(tmp_path: Path, heartbeat_timeout_s: float = 10.0) -> ManagerSettings:
    return ManagerSettings(db_path=str(tmp_path / "m.db"), heartbeat_timeout_s=heartbeat_timeout_s, model_dirs=["/"])
