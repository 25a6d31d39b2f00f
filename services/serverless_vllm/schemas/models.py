"""Models and their registrations: policy, engine arguments, states, start times, cache progress, what
`GET /v1/models/{alias}` answers; and the OpenAI error body."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .adapters import adapter_model_name, check_adapter_spec

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ALIAS_RE = re.compile(ALIAS_PATTERN)


class Strict(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Patch(Strict):
    """Base for PATCH bodies: only the fields a client gave change (a null may mean something, as a key's expiry
    none), so whoever passes one on sends the fields set, not every field (`model_dump_json(exclude_unset=True)`)."""


# --------------------------------------------------------------------------- models


# Constrained field types, defined once and shared by registration and PATCH bodies.
Replicas = Annotated[int, Field(ge=0, le=64)]
MaxReplicas = Annotated[int, Field(ge=1, le=64)]
IdleTimeout = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
Concurrency = Annotated[float, Field(gt=0, le=10_000)]


class Routing(StrEnum):
    """How the router chooses among a model's ready replicas (router/policy.py, router/prefix.py)."""

    # A request with a session key (X-Session-ID, else the body's `user`) goes to that key's replica, one without to
    # the less loaded of two: the routing of every model before this field existed, hence the default.
    SESSION = "session"
    LEAST_LOADED = "least_loaded"  # the less loaded of two replicas; session keys are ignored
    # The replica that recently served the longest part of the prompt, unless it is busier than that is worth; with
    # no part of the prompt seen, the less loaded of two.
    PREFIX = "prefix"


class ModelPolicy(Strict):
    """Serverless policy of one model: how many replicas, when to scale and sleep, how requests are routed."""

    min_replicas: Replicas = 0
    max_replicas: MaxReplicas = 1
    idle_timeout_s: IdleTimeout = 300.0
    target_concurrency: Concurrency = 8.0
    preload: bool = True
    routing: Routing = Routing.SESSION

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


class LoadFormat(StrEnum):
    """vLLM's weight loaders a registration may choose (`--load-format`); the others read other files or formats."""

    AUTO = "auto"  # safetensors, else PyTorch .bin files
    SAFETENSORS = "safetensors"
    RUNAI_STREAMER = "runai_streamer"  # Run:ai Model Streamer (the `vllm[runai]` extra); concurrent reads
    FASTSAFETENSORS = "fastsafetensors"  # the `fastsafetensors` package; GPU Direct Storage where there is one


# The adapter ranks vLLM accepts as --max-lora-rank.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class SchedulingPolicy(StrEnum):
    """vLLM's --scheduling-policy: `priority` serves a waiting request by its `priority` field (lower first), which
    the router sets from the priority class of the request's key (router/tenant_gate.py)."""

    FCFS = "fcfs"
    PRIORITY = "priority"


class EngineArgs(Strict):
    """The vLLM engine arguments a registration may set."""

    task: ModelTask = ModelTask.GENERATE
    max_model_len: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    dtype: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")] = "auto"
    load_format: LoadFormat = LoadFormat.AUTO
    # A hub model's branch, tag or commit (None: its default branch): vLLM's --revision, what the workers prefetch.
    revision: Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")] | None = None
    scheduling_policy: SchedulingPolicy = SchedulingPolicy.FCFS
    extra_args: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=128)] = []
    # LoRA (vLLM's --enable-lora and its sizes): an engine of a base with adapters registered gets it regardless.
    enable_lora: bool = False
    max_loras: Annotated[int, Field(ge=1, le=256)] = 4  # adapters one replica holds (the manager unloads LRU beyond)
    max_lora_rank: LoraRank = 16
    max_cpu_loras: Annotated[int, Field(ge=1, le=4096)] | None = None  # vLLM's CPU cache of adapters (>= max_loras)

    @model_validator(mode="after")
    def _cpu_loras(self) -> EngineArgs:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        return self


class ModelSpec(ModelPolicy, EngineArgs):
    """A registration: alias -> model, engine arguments and policy. Body of POST /v1/models/register."""

    alias: Annotated[str, Field(min_length=1, max_length=128)]
    model_name: Annotated[str, Field(min_length=1, max_length=4096)]
    # A LoRA adapter (schemas/adapters.py): served by the engines of the registered model `base`; `adapter` is its
    # hub id or path, and `model_name` is set to it.
    base: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    adapter: Annotated[str, Field(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _adapter_name(cls, data: Any) -> Any:
        return adapter_model_name(data)

    @field_validator("alias")
    @classmethod
    def _alias_pattern(cls, v: str) -> str:
        if not _ALIAS_RE.match(v):
            raise ValueError(
                "alias must start with a letter or digit and contain only letters, digits, '.', '_', ':' or '-'"
            )
        return v

    @model_validator(mode="after")
    def _prefix_needs_the_cache(self) -> ModelSpec:
        # vLLM caches prefixes by default; routing by prefix to engines told not to would only unbalance them.
        if self.routing is Routing.PREFIX and any(
            a.split("=", 1)[0].replace("_", "-") == "--no-enable-prefix-caching" for a in self.extra_args
        ):
            raise ValueError("routing 'prefix' needs the engines' prefix cache (extra_args turn it off)")
        return self

    @model_validator(mode="after")
    def _adapter_fields(self) -> ModelSpec:
        check_adapter_spec(self)
        return self

    def engine_args(self) -> EngineArgs:
        return EngineArgs.model_validate(self.model_dump(include=set(EngineArgs.model_fields)))

    def policy(self) -> ModelPolicy:
        return ModelPolicy.model_validate(self.model_dump(include=set(ModelPolicy.model_fields)))

    def same_engine(self, other: ModelSpec) -> bool:
        """Whether two registrations would start the same engine (policy may differ)."""
        return self.model_name == other.model_name and self.engine_args() == other.engine_args()


class ModelPatch(Patch):
    """Body of PATCH /v1/models/{alias}: policy changes only (engine changes need a new registration)."""

    min_replicas: Replicas | None = None
    max_replicas: MaxReplicas | None = None
    idle_timeout_s: IdleTimeout | None = None
    target_concurrency: Concurrency | None = None
    preload: bool | None = None
    routing: Routing | None = None


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
    sleep_level: int | None = None  # asleep: vLLM's level (1: weights in host memory, 2: discarded)
    error: str | None = None
    adapters: list[str] = []  # LoRA adapters its engine reports loaded (a base's replica)


class ModelPhase(StrEnum):
    """What a loading model is doing to become ready."""

    STARTING = "starting"  # an engine is being started (placed, launching, loading weights)
    WAKING = "waking"  # a sleeping engine is being woken (GPU warm tier)
    PREFETCHING = "prefetching"  # starting, and its worker is still downloading the model's files into its cache


class StartTimes(BaseModel):
    """How long this model's past starts took: moving averages measured by the manager, kept in its registry."""

    start_s: float | None = None  # an engine started: from its placement to ready
    starts: int = 0
    wake_s: float | None = None  # a sleeping engine woken: from the decision to wake it to ready
    wakes: int = 0


class CacheState(StrEnum):
    """A hub model's files in one worker's cache (worker/prefetch.py)."""

    QUEUED = "queued"  # asked for; the worker downloads one model at a time
    FETCHING = "fetching"
    CACHED = "cached"
    FAILED = "failed"


class CacheProgress(BaseModel):
    """One model's files in one worker's cache, as `GET /v1/models/{alias}` shows them (`cache`, by worker)."""

    state: CacheState
    bytes: int = 0  # in the cache so far
    total: int | None = None  # the files' size; None until the worker has listed them
    error: str | None = None  # failed: why


class CacheFault(StrEnum):
    """Why a download failed, which decides what becomes of its model (manager/model_cache.py)."""

    SOURCE = "source"  # no such repository or revision, access refused: the model fails, whichever worker says so
    WORKER = "worker"  # it cannot hold or get them (disk too small, offline): fails the model when no worker can
    OTHER = "other"  # the network, the hub's own errors: shown; the engines may still get the files themselves


class CacheStatus(CacheProgress):
    """A worker's report of one model the manager asked it to prefetch (registration and heartbeats)."""

    model_name: str
    revision: str | None = None
    fault: CacheFault | None = None  # failed: why


class PrefetchOrder(BaseModel):
    """A hub model a worker should have in its cache (heartbeat replies: the complete list, every time)."""

    model_name: str
    revision: str | None = None


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
    cache: dict[str, CacheProgress] = {}  # a hub model's files in the caches of the workers asked to prefetch it
    base: str | None = None  # a LoRA adapter: its base model's alias (`replicas`: the base's that hold it)


def failure_reason(last_error: str | None) -> str | None:
    """A failure as clients are told it: its reason, the first line of `last_error` (the engine's log lines after it,
    with the servers' paths and stack frames, are the operator's)."""
    return last_error.strip().partition("\n")[0] if last_error else last_error


# --------------------------------------------------------------------------- workers


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
