"""Wire schemas shared by router, manager and worker.

Every message that crosses a process boundary (HTTP or Ray) is one of these models, defined once here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ALIAS_RE = re.compile(ALIAS_PATTERN)


class Strict(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- models


# Constrained field types, defined once and shared by registration and PATCH bodies.
Replicas = Annotated[int, Field(ge=0, le=64)]
MaxReplicas = Annotated[int, Field(ge=1, le=64)]
IdleTimeout = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
Concurrency = Annotated[float, Field(gt=0, le=10_000)]


class ModelPolicy(Strict):
    """Serverless policy of one model: how many replicas, when to scale and sleep."""

    min_replicas: Replicas = 0
    max_replicas: MaxReplicas = 1
    idle_timeout_s: IdleTimeout = 300.0
    target_concurrency: Concurrency = 8.0
    preload: bool = True

    @model_validator(mode="after")
    def _min_le_max(self) -> ModelPolicy:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ModelTask(StrEnum):
    """What a model's engine serves (vLLM's runner and conversion): which endpoints it answers."""

    GENERATE = "generate"  # chat, completions, Responses, Messages (and audio, for a speech model)
    EMBED = "embed"  # embeddings, pooling, score and rerank by similarity
    CLASSIFY = "classify"  # classification, pooling; score and rerank as a cross-encoder


class EngineArgs(Strict):
    """The vLLM engine arguments a registration may set."""

    task: ModelTask = ModelTask.GENERATE
    max_model_len: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    dtype: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")] = "auto"
    extra_args: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=128)] = []


class ModelSpec(ModelPolicy, EngineArgs):
    """A registration: alias -> model, engine arguments and policy. Body of POST /v1/models/register."""

    alias: Annotated[str, Field(min_length=1, max_length=128)]
    model_name: Annotated[str, Field(min_length=1, max_length=4096)]

    @field_validator("alias")
    @classmethod
    def _alias_pattern(cls, v: str) -> str:
        if not _ALIAS_RE.match(v):
            raise ValueError(
                "alias must start with a letter or digit and contain only letters, digits, '.', '_', ':' or '-'"
            )
        return v

    def engine_args(self) -> EngineArgs:
        return EngineArgs.model_validate(self.model_dump(include=set(EngineArgs.model_fields)))

    def policy(self) -> ModelPolicy:
        return ModelPolicy.model_validate(self.model_dump(include=set(ModelPolicy.model_fields)))

    def same_engine(self, other: ModelSpec) -> bool:
        """Whether two registrations would start the same engine (policy may differ)."""
        return self.model_name == other.model_name and self.engine_args() == other.engine_args()


class ModelPatch(Strict):
    """Body of PATCH /v1/models/{alias}: policy changes only (engine changes need a new registration)."""

    min_replicas: Replicas | None = None
    max_replicas: MaxReplicas | None = None
    idle_timeout_s: IdleTimeout | None = None
    target_concurrency: Concurrency | None = None
    preload: bool | None = None


class ReplicaState(StrEnum):
    PENDING = "pending"  # decided by the manager, not yet reported by the worker
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    FAILED = "failed"


class ModelState(StrEnum):
    COLD = "cold"  # registered, no replica: loads on the next request
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"
    FAILED = "failed"


class ReplicaInfo(BaseModel):
    replica_id: str
    worker_id: str
    gpus: list[int] = []
    state: ReplicaState
    asleep: bool = False
    error: str | None = None


class ModelPhase(StrEnum):
    """What a loading model is doing to become ready."""

    STARTING = "starting"  # an engine is being started (placed, launching, loading weights)
    WAKING = "waking"  # a sleeping engine is being woken (GPU warm tier)


class StartTimes(BaseModel):
    """How long this model's past starts took: moving averages measured by the manager, kept in its registry."""

    start_s: float | None = None  # an engine started: from its placement to ready
    starts: int = 0
    wake_s: float | None = None  # a sleeping engine woken: from the decision to wake it to ready
    wakes: int = 0


class ModelInfo(BaseModel):
    """GET /v1/models/{alias}."""

    alias: str
    model_name: str
    state: ModelState
    phase: ModelPhase | None = None  # while loading: starting or waking
    expected_ready_s: float | None = None  # while loading: seconds until ready, from start_times (None: unknown)
    start_times: StartTimes = StartTimes()
    engine: EngineArgs
    policy: ModelPolicy
    desired_replicas: int
    replicas: list[ReplicaInfo]
    last_error: str | None = None
    created_at: float


# --------------------------------------------------------------------------- workers


class GPUInfo(BaseModel):
    index: int
    name: str
    uuid: str
    memory_total_mb: int
    memory_free_mb: int
    utilization_pct: float = 0.0


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


class Assignment(BaseModel):
    """One replica a worker must run: the manager's desired state for that worker."""

    replica_id: str
    alias: str
    model_name: str
    engine: EngineArgs
    gpus: list[int] = []
    asleep: bool = False


class WorkerRegistration(BaseModel):
    worker_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    url: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^https?://")]
    gpus: list[GPUInfo] = []
    cpu_slots: Annotated[int, Field(ge=0, le=1024)] = 0
    sleep_supported: bool = False
    engines: list[EngineStatus] = []
    version: str = ""


class Heartbeat(BaseModel):
    worker_id: str
    gpus: list[GPUInfo] = []
    engines: list[EngineStatus] = []


class HeartbeatReply(BaseModel):
    # Set when the manager does not know this worker (it restarted, or declared it dead): register again.
    reregister: bool = False
    assignments: list[Assignment] = []


class WorkerState(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
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


class FleetStatus(BaseModel):
    """GET /status at the router (admin): every model and every worker, as `svllm status` shows them."""

    models: list[ModelInfo]
    workers: list[WorkerInfo]


# --------------------------------------------------------------------------- routing


class Endpoint(BaseModel):
    replica_id: str
    worker_id: str
    url: str


class ModelRoute(BaseModel):
    state: ModelState
    task: ModelTask = ModelTask.GENERATE  # which endpoints it serves: refused at the router otherwise
    endpoints: list[Endpoint] = []  # ready replicas only
    error: str | None = None  # why the model is failed (state FAILED)
    created: int = 0  # registration time (unix seconds), for the OpenAI model list
    # Loading: when it is expected ready (unix seconds), from its past starts. Left out of the JSON when unknown (most
    # routes): the table of 10,000 models stays as small as before.
    ready_at: float | None = Field(default=None, exclude_if=lambda v: v is None)


class RoutingTable(BaseModel):
    """What the router needs to serve without asking the manager: every registered alias and its ready replicas."""

    version: int
    epoch: str  # changes when the manager restarts, so routers never mistake an old version for a new one
    models: dict[str, ModelRoute]


class ModelLoad(BaseModel):
    in_flight: int = 0
    queued: int = 0
    requests: int = 0  # requests started since the previous report


class DemandReport(BaseModel):
    """Router -> manager, periodically and on cold start: load per model, off the hot path."""

    router_id: str
    models: dict[str, ModelLoad] = {}
    wake: list[str] = []  # aliases with requests waiting and no ready replica
    failed_endpoints: list[Endpoint] = []  # upstreams that refused connections


class PlacementRejection(BaseModel):
    worker_id: str
    reason: str


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
