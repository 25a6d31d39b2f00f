"""The manager's and the router's settings (see the package's docstring)."""

from __future__ import annotations

import os
import re
import socket
from typing import Any, Literal

from pydantic import field_validator

from ..settings_base import Settings as _Settings
from ..settings_base import default_state_dir as _default_state_dir
from ..settings_base import setting as _setting
from ..settings_base import truthy as _text_switch


class ManagerSettings(_Settings):
    host: str = _setting("0.0.0.0", env="MANAGER_HOST", description="address the manager listens on")
    port: int = _setting(9000, env="MANAGER_PORT", description="port the manager listens on")
    db_path: str = _setting(
        env="MANAGER_DB",
        description="SQLite file of the model registry (':memory:': none)",
        default_factory=lambda: str(_default_state_dir() / "manager.db"),
    )
    heartbeat_timeout_s: float = _setting(
        60.0,
        env="HEARTBEAT_TIMEOUT",
        description="seconds without heartbeat: a worker is unhealthy (out of routing); twice: dead (replicas move)",
    )
    reconcile_interval_s: float = _setting(
        1.0, env="RECONCILE_INTERVAL", description="seconds between reconcile passes (desired vs reported replicas)"
    )
    scale_down_delay_s: float = _setting(
        30.0, env="SCALE_DOWN_DELAY", description="seconds load must stay low before a replica goes (hysteresis)"
    )
    failed_retry_after_s: float = _setting(
        30.0, env="FAILED_RETRY_AFTER", description="seconds a model whose engine failed stays failed (no retries)"
    )
    worker_timeout_s: float = _setting(
        10.0, env="WORKER_TIMEOUT", description="seconds the manager waits for a worker to answer a call"
    )
    probe_attempts: int = _setting(
        3,
        env="PROBE_ATTEMPTS",
        description="refused /health probes in a row before a worker a router could not reach is declared dead",
        ge=1,
    )
    probe_interval_s: float = _setting(
        0.5, env="PROBE_INTERVAL", description="seconds between two probes of a worker a router could not reach", ge=0
    )
    dead_worker_retention_s: float = _setting(
        600.0,
        env="DEAD_WORKER_RETENTION",
        description="seconds a dead worker stays listed (GET /workers, metrics) before it is forgotten",
        ge=0,
    )
    sleep_host_memory_fraction: float = _setting(
        0.8, env="SLEEP_HOST_MEMORY_FRACTION", gt=0, le=1,
        description="share of a GPU worker's host memory the weights of its engines asleep at level 1 may take; "
        "an idle engine whose weights do not fit sleeps at level 2 (weights dropped, reloaded from disk on wake)",
    )  # fmt: skip
    gpu_engine_overhead_mb: int = _setting(
        1024,
        env="GPU_ENGINE_OVERHEAD_MB",
        description="GPU memory an engine holds outside its gpu_memory_utilization (its CUDA context, the driver's "
        "share): kept free for each engine on a shared GPU, so that vLLM's start-up check passes (0: fractions only)",
        ge=0,
    )
    prefetch_workers: int = _setting(
        2,
        env="PREFETCH_WORKERS",
        description="workers that download a newly registered hub model into their cache before it is needed: the "
        "first ones placement would choose, at most its max_replicas (0: no prefetch)",
        ge=0,
    )
    model_dirs: list[str] = _setting(
        [],
        env="SVLLM_MODEL_DIRS",
        description="directories local model paths must lie under, comma or colon list (empty: hub ids only; "
        "'/': any absolute path)",
    )

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        return [d for d in re.split(r"[,:]", value) if d.strip()] if isinstance(value, str) else value


class RouterSettings(_Settings):
    host: str = _setting("0.0.0.0", env="ROUTER_HOST", description="address the router listens on")
    port: int = _setting(18000, env="ROUTER_PORT", description="port the router listens on")
    manager_url: str = _setting(
        "http://127.0.0.1:9000", env="MANAGER_URL", description="the manager (a worker may name a router instead)"
    )
    router_id: str = _setting(
        env="ROUTER_ID",
        description="this router process's name in its load reports (one per process: unset with --workers)",
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
    )
    processes: int = _setting(1, env="ROUTER_PROCESSES", description="router processes (gunicorn, >1)")
    # Limits of keys made at run time are enforced by each router process on its own (docs/tenants.md).
    fair_queue: Literal["off", "fifo", "fair"] = _setting(
        "off",
        env="FAIR_QUEUE",
        description="requests of API keys at a model's in-flight cap: off (503 at once), fair (wait by priority "
        "class, tenants in turn) or fifo (wait in arrival order)",
    )
    key_limit_routers: int = _setting(
        1,
        env="KEY_LIMIT_ROUTERS",
        description="routers sharing each key's limits: each enforces 1/N of them (and 1/ROUTER_PROCESSES of that)",
        ge=1,
    )
    request_timeout_s: float = _setting(
        600.0, env="REQUEST_TIMEOUT", description="seconds an upstream request may take"
    )
    drain_timeout_s: float = _setting(
        60.0,
        env="ROUTER_DRAIN_TIMEOUT",
        ge=0,
        description="seconds a router told to stop (SIGTERM) lets its requests in flight finish, streams and requests "
        "held for a cold start included (it takes no new connection meanwhile); then they are cut",
    )
    cold_start_timeout_s: float = _setting(
        600.0, env="COLD_START_TIMEOUT", description="seconds a request waits for its model to start"
    )
    max_queue_per_model: int = _setting(
        256, env="MAX_QUEUE_PER_MODEL", description="requests held per cold model before 503 queue_full"
    )
    hold_keepalive_s: float = _setting(
        5.0,
        env="HOLD_KEEPALIVE_INTERVAL",
        description="seconds a held streaming request waits before its stream starts with SSE comments "
        "(': loading model ...'), and between two of them (0: no comments, the status waits for the model)",
        ge=0,
    )
    report_interval_s: float = _setting(
        1.0, env="REPORT_INTERVAL", description="seconds between the router's load and usage reports to the manager"
    )
    max_body_bytes: int = _setting(
        8 * 1024 * 1024, env="MAX_BODY_BYTES", description="request body limit of the router, in bytes"
    )
    # Unknown top-level fields of inference requests are a 400 (security/inference.py), unless this is set
    # (a newer vLLM on the workers with parameters the router does not know yet).
    allow_unknown_fields: bool = _setting(
        False,
        env="ALLOW_UNKNOWN_FIELDS",
        description="pass request fields this vLLM version does not know (1/true/yes/on)",
    )
    # Backpressure: vLLM would queue without bound.
    max_in_flight_per_replica: int = _setting(
        256,
        env="MAX_INFLIGHT_PER_REPLICA",
        description="requests in flight per ready replica before 503 overloaded (0: no cap)",
    )

    # Stored Responses live in the engine that made them: the router remembers where (router/responses.py).
    responses_max_ids: int = _setting(
        100_000, env="RESPONSES_MAX_IDS", description="response ids remembered with their replica (least recent out)"
    )
    responses_retention_s: float = _setting(
        3600.0, env="RESPONSES_RETENTION", description="seconds a response id is remembered after its last use"
    )
    responses_probe_replicas: int = _setting(
        16, env="RESPONSES_PROBE_REPLICAS", description="replicas asked for a response id the router does not know"
    )
    # Models routed by prefix (`routing: prefix`): what the router remembers of the prompts sent (router/prefix.py).
    prefix_blocks: int = _setting(
        65536, env="PREFIX_ROUTING_BLOCKS", description="prompt blocks remembered, all models (LRU out)", ge=1
    )
    prefix_ttl_s: float = _setting(600.0, env="PREFIX_ROUTING_TTL", description="seconds a block counts", gt=0)
    prefix_spill: float = _setting(
        8.0, env="PREFIX_ROUTING_SPILL", description="extra requests in flight a whole-prompt match is worth", ge=0
    )
    # A wrong model name asked again and again: the manager's 404 is remembered (router/negative_cache.py).
    unknown_model_ttl_s: float = _setting(
        2.0,
        env="UNKNOWN_MODEL_TTL",
        description="seconds the router answers an unregistered alias's 404 itself, without asking the manager "
        "(0: always ask)",
        ge=0,
    )
    # A stream whose replica dies mid-generation goes on on another one (router/migration.py).
    stream_migration: bool = _setting(
        True,
        env="STREAM_MIGRATION",
        description="continue a chat/completion stream cut by a dead replica on another replica, from the text "
        "sent so far (0: cut it with a stream_interrupted error event)",
    )

    @field_validator("allow_unknown_fields", mode="before")
    @classmethod
    def _truthy(cls, value: Any) -> Any:
        return _text_switch(value)
