"""Workers and their engines: registration, heartbeats and their replies, assignments, worker states."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field

from .models import CacheStatus, EngineArgs, ModelInfo, PrefetchOrder, ReplicaState


class GPUInfo(BaseModel):
    index: int
    name: str
    uuid: str
    memory_total_mb: int
    memory_free_mb: int
    utilization_pct: float = 0.0


class HostMemory(BaseModel):
    """A worker's host (CPU) memory, in bytes: what a level-1 sleep's weights would be offloaded to."""

    total_bytes: int
    available_bytes: int


class EngineStatus(BaseModel):
    """A worker's report of one engine it runs."""

    replica_id: str
    alias: str
    state: ReplicaState
    gpus: list[int] = []
    model_name: str = ""
    port: int | None = None
    pid: int | None = None
    restarts: int = 0
    error: str | None = None
    log_tail: list[str] = []
    sleep_level: int | None = None  # SLEEPING: the vLLM sleep level it sleeps at
    weights_bytes: int | None = None  # the size of its model's weight files, when the worker can tell
    # LoRA (worker/adapters.py): started with it; the adapters its engine lists as loaded (its own /v1/models);
    # the ones it refused, with the engine's reason. Left out of the JSON when empty (most engines).
    lora: bool = Field(default=False, exclude_if=lambda v: not v)
    adapters: list[str] = Field(default=[], exclude_if=lambda v: not v)
    adapter_errors: dict[str, str] = Field(default={}, exclude_if=lambda v: not v)


class Assignment(BaseModel):
    """One replica a worker must run: the manager's desired state for that worker."""

    replica_id: str
    alias: str
    model_name: str
    engine: EngineArgs
    gpus: list[int] = []
    asleep: bool = False
    sleep_level: Annotated[int, Field(ge=1, le=2)] = 1  # asleep: vLLM's sleep level (manager/sleep_level.py)
    # The LoRA adapters its engine should hold, name -> weights (manager/adapters.py); the worker loads the missing.
    adapters: dict[str, str] = Field(default={}, exclude_if=lambda v: not v)


class WorkerRegistration(BaseModel):
    worker_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    url: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^https?://")]
    gpus: list[GPUInfo] = []
    cpu_slots: Annotated[int, Field(ge=0, le=1024)] = 0
    sleep_supported: bool = False
    engines: list[EngineStatus] = []
    version: str = ""
    host_memory: HostMemory | None = None  # None: an older worker (its engines sleep at level 1)
    cache: list[CacheStatus] = []  # the models it was asked to prefetch (after a manager restart: it says so)


class Heartbeat(BaseModel):
    worker_id: str
    gpus: list[GPUInfo] = []
    engines: list[EngineStatus] = []
    host_memory: HostMemory | None = None
    cache: list[CacheStatus] = []  # the models it was asked to prefetch, with their progress
    leaving: bool = False  # shutting down: its replicas drain (manager/draining.py) and are placed elsewhere


class HeartbeatReply(BaseModel):
    # Set when the manager does not know this worker (it restarted, or declared it dead): register again.
    reregister: bool = False
    assignments: list[Assignment] = []
    prefetch: list[PrefetchOrder] = Field(default=[], exclude_if=lambda v: not v)  # hub models to cache (if any)


class WorkerState(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # shutting down (SIGTERM): out of routing and placement while its requests finish
    DEAD = "dead"


class WorkerInfo(BaseModel):
    worker_id: str
    url: str
    state: WorkerState
    gpus: list[GPUInfo]
    cpu_slots: int
    sleep_supported: bool
    heartbeat_age_s: float
    engines: list[EngineStatus]
    host_memory: HostMemory | None = None
    # Each GPU's memory in use outside this fleet's engines, by GPU index (MiB; placement leaves it out).
    foreign_memory_mb: dict[int, int] = {}


class FleetStatus(BaseModel):
    """GET /status at the router (admin): every model and every worker, as `svllm status` shows them."""

    models: list[ModelInfo]
    workers: list[WorkerInfo]


# --------------------------------------------------------------------------- routing
