"""All configuration in one typed place.

Each setting has an environment variable (the names of the design: MANAGER_URL, WORKER_ID, PUBLIC_URL, ...);
command-line flags override them. Settings objects are immutable and passed to the objects that need them.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


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
    heartbeat_timeout_s: float = 60.0
    reconcile_interval_s: float = 1.0
    # Hysteresis for autoscaling: load must stay below the lower target this long before a replica goes.
    scale_down_delay_s: float = 30.0
    # A model whose engine failed to start is not retried automatically for this long.
    failed_retry_after_s: float = 30.0
    worker_timeout_s: float = 10.0
    # Directories local model paths must lie under (security/models.py); empty: hub ids only. "/" allows any
    # absolute path (what `svllm up` uses on a developer's machine).
    model_dirs: list[str] = []

    @classmethod
    def from_env(cls, **overrides: Any) -> ManagerSettings:
        values = {
            "host": _env("MANAGER_HOST", "0.0.0.0"),
            "port": int(_env("MANAGER_PORT", 9000)),
            "db_path": _env("MANAGER_DB", str(_default_state_dir() / "manager.db")),
            "heartbeat_timeout_s": float(_env("HEARTBEAT_TIMEOUT", 60.0)),
            "scale_down_delay_s": float(_env("SCALE_DOWN_DELAY", 30.0)),
            "failed_retry_after_s": float(_env("FAILED_RETRY_AFTER", 30.0)),
            "model_dirs": [d for d in re.split(r"[,:]", _env("SVLLM_MODEL_DIRS", "")) if d.strip()],
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
    # Unknown top-level fields of inference requests are a 400 (security/inference.py), unless this is set
    # (a newer vLLM on the workers with parameters the router does not know yet).
    allow_unknown_fields: bool = False
    # Backpressure: requests in flight per ready replica beyond which a model answers 503 "overloaded" at once
    # (vLLM would queue them without bound); 0 = no cap.
    max_in_flight_per_replica: int = 256

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
            "max_body_bytes": int(_env("MAX_BODY_BYTES", 8 * 1024 * 1024)),
            "allow_unknown_fields": str(_env("ALLOW_UNKNOWN_FIELDS", "0")).lower() in ("1", "true", "yes", "on"),
            "max_in_flight_per_replica": int(_env("MAX_INFLIGHT_PER_REPLICA", 256)),
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
    # Niceness added to engine processes. An engine saturating the CPU (a CPU worker) would otherwise make the
    # worker's relay and heartbeats wait behind its threads; 0 leaves engines at the worker's priority.
    engine_nice: int = Field(default=5, ge=0, le=19)

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
            "engine_nice": int(_env("ENGINE_NICE", 5)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def advertised_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        return f"http://{host}:{self.port}"


class AuthSettings(_Settings):
    """Credentials of every service (enforced by security/auth.py). Secrets are SecretStr: never in a repr or log.

    mode "on" (the default) needs the credentials of the service's role; "off" is for local development only
    and must be asked for explicitly (SVLLM_AUTH=off; `svllm up` without credentials).
    """

    mode: Literal["on", "off"] = "on"
    api_keys: tuple[SecretStr, ...] = ()  # clients: inference and model listing
    admin_key: SecretStr | None = None  # register, patch, delete, /workers; also the router's key to the manager
    worker_token: SecretStr | None = None  # worker <-> manager, router -> worker

    @property
    def enabled(self) -> bool:
        return self.mode == "on"

    @property
    def configured(self) -> bool:
        return bool(self.api_keys or self.admin_key or self.worker_token)

    def worker_headers(self) -> dict[str, str]:
        """What a worker, the manager and the router present to each other (worker token)."""
        return _bearer(self.worker_token) if self.enabled else {}

    def admin_headers(self) -> dict[str, str]:
        """What the router presents to the manager's HTTP API (the admin key, as a service credential)."""
        return _bearer(self.admin_key) if self.enabled else {}

    @classmethod
    def from_env(cls, **overrides: Any) -> AuthSettings:
        mode = str(_env("SVLLM_AUTH", "on")).strip().lower()
        if mode not in ("on", "off"):
            raise ValueError(f"SVLLM_AUTH must be 'on' or 'off', not {mode!r}")
        keys = [k.strip() for k in str(_env("SVLLM_API_KEYS", "")).split(",") if k.strip()]
        key_file = _env("SVLLM_API_KEYS_FILE", "")
        if key_file:
            # One key per line; blank lines and '#' comments ignored. A missing file is an error (fail closed).
            lines = Path(key_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        admin, token = str(_env("SVLLM_ADMIN_KEY", "")).strip(), str(_env("SVLLM_WORKER_TOKEN", "")).strip()
        values: dict[str, Any] = {
            "mode": mode,
            "api_keys": tuple(SecretStr(k) for k in keys),
            "admin_key": SecretStr(admin) if admin else None,
            "worker_token": SecretStr(token) if token else None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _bearer(secret: SecretStr | None) -> dict[str, str]:
    return {"authorization": f"Bearer {secret.get_secret_value()}"} if secret is not None else {}
