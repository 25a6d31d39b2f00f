"""All configuration in one typed place.

Each setting has an environment variable (the names of the design: MANAGER_URL, WORKER_ID, PUBLIC_URL, ...);
command-line flags override them. Settings objects are immutable and passed to the objects that need them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _env(name: str, default: Any) -> Any:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value


def _default_state_dir() -> Path:
    return Path(_env("SVLLM_STATE_DIR", Path.home() / ".cache" / "serverless-vllm"))


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ManagerSettings(_Settings):
    host: str = "0.0.0.0"
    port: int = 9000
    db_path: str = Field(default_factory=lambda: str(_default_state_dir() / "manager.db"))
    # No heartbeat for this long: unhealthy (out of routing); twice as long: dead (replicas move elsewhere).
    heartbeat_timeout: float = 60.0
    reconcile_interval: float = 1.0
    # Hysteresis for autoscaling: load must stay below the lower target this long before a replica goes.
    scale_down_delay_s: float = 30.0
    # A model whose engine failed to start is not retried automatically for this long.
    failed_retry_after_s: float = 30.0
    worker_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, **overrides: Any) -> ManagerSettings:
        values = {
            "host": _env("MANAGER_HOST", "0.0.0.0"),
            "port": int(_env("MANAGER_PORT", 9000)),
            "db_path": _env("MANAGER_DB", str(_default_state_dir() / "manager.db")),
            "heartbeat_timeout": float(_env("HEARTBEAT_TIMEOUT", 60.0)),
            "scale_down_delay_s": float(_env("SCALE_DOWN_DELAY", 30.0)),
            "failed_retry_after_s": float(_env("FAILED_RETRY_AFTER", 30.0)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class RouterSettings(_Settings):
    host: str = "0.0.0.0"
    port: int = 18000
    manager_url: str = "http://127.0.0.1:9000"
    router_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    processes: int = 1
    request_timeout_s: float = 600.0
    # How long a request may wait for its model to cold-start (separate from the request timeout).
    cold_start_timeout_s: float = 600.0
    max_queue_per_model: int = 256
    report_interval_s: float = 1.0
    max_body_bytes: int = 8 * 1024 * 1024

    @classmethod
    def from_env(cls, **overrides: Any) -> RouterSettings:
        values = {
            "host": _env("ROUTER_HOST", "0.0.0.0"),
            "port": int(_env("ROUTER_PORT", 18000)),
            "manager_url": _env("MANAGER_URL", "http://127.0.0.1:9000"),
            "processes": int(_env("ROUTER_PROCESSES", 1)),
            "request_timeout_s": float(_env("REQUEST_TIMEOUT", 600.0)),
            "cold_start_timeout_s": float(_env("COLD_START_TIMEOUT", 600.0)),
            "max_queue_per_model": int(_env("MAX_QUEUE_PER_MODEL", 256)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class WorkerSettings(_Settings):
    worker_id: str = Field(default_factory=socket.gethostname)
    host: str = "0.0.0.0"
    port: int = 7000
    manager_url: str = "http://127.0.0.1:9000"
    # The address others use to reach this worker (port forwarding, NAT); derived from host/port if empty.
    public_url: str = ""
    heartbeat_interval_s: float = 5.0
    engine_start_timeout_s: float = 900.0
    # Engines a CPU-only worker runs at once; 0 = derive from memory (about 4 GiB each).
    cpu_slots: int = 0
    cpu_kvcache_gib: int = 1
    log_dir: str = Field(default_factory=lambda: str(_default_state_dir() / "engines"))
    # Arguments added to every engine this worker starts (e.g. --enforce-eager on CPU to start faster).
    engine_extra_args: list[str] = []

    @classmethod
    def from_env(cls, **overrides: Any) -> WorkerSettings:
        values = {
            "worker_id": _env("WORKER_ID", socket.gethostname()),
            "host": _env("WORKER_HOST", "0.0.0.0"),
            "port": int(_env("WORKER_PORT", 7000)),
            "manager_url": _env("MANAGER_URL", "http://127.0.0.1:9000"),
            "public_url": _env("PUBLIC_URL", ""),
            "heartbeat_interval_s": float(_env("HEARTBEAT_INTERVAL", 5.0)),
            "engine_start_timeout_s": float(_env("ENGINE_START_TIMEOUT", 900.0)),
            "cpu_slots": int(_env("CPU_SLOTS", 0)),
            "cpu_kvcache_gib": int(_env("VLLM_CPU_KVCACHE_SPACE", 1)),
            "log_dir": _env("ENGINE_LOG_DIR", str(_default_state_dir() / "engines")),
            "engine_extra_args": _env("ENGINE_EXTRA_ARGS", "").split(),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def advertised_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        return f"http://{host}:{self.port}"
