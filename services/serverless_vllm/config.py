"""All configuration in one typed place: each setting is written once, here.

A setting is a field of one settings model per component (ManagerSettings, RouterSettings, WorkerSettings,
AuthSettings, RaySettings for `svllm ray-services`, CliSettings for the `svllm` command itself) with its type, its
default, its environment variable (the field's `validation_alias`: MANAGER_URL, WORKER_ID, PUBLIC_URL, ...) and a
one-line `description`. The command line (cli.py, ray_mode/cli.py) derives each flag's default and help from the
field (`add_flag`), and tests/unit/test_settings.py checks the README's table and `.env.example` against these
models. Settings objects are immutable and passed to the objects that need them.

`XSettings.from_env(**overrides)` reads the environment when it is called (never at import); overrides that are
None are ignored, so unset flags fall back to the environment, then to the default. An empty variable counts as
unset. Only the variables named here are read, and their values are parsed as documented per field (no JSON).
Constructing a model directly (`ManagerSettings(db_path=..., heartbeat_timeout_s=30)`) takes the values given and
the defaults only, never the environment: what a test or a Serve replica passes is what it gets.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import SecretStr, field_validator, model_validator

from .ray_mode import DEFAULT_NAMESPACE  # constants only: no Ray import
from .settings_base import Settings as _Settings
from .settings_base import default_state_dir as _default_state_dir
from .settings_base import setting as _setting


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
    request_timeout_s: float = _setting(
        600.0, env="REQUEST_TIMEOUT", description="seconds an upstream request may take"
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
        1.0, env="REPORT_INTERVAL", description="seconds between the router's load reports to the manager"
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
    # A wrong model name asked again and again: the manager's 404 is remembered (router/negative_cache.py).
    unknown_model_ttl_s: float = _setting(
        2.0,
        env="UNKNOWN_MODEL_TTL",
        description="seconds the router answers an unregistered alias's 404 itself, without asking the manager "
        "(0: always ask)",
        ge=0,
    )

    @field_validator("allow_unknown_fields", mode="before")
    @classmethod
    def _truthy(cls, value: Any) -> Any:
        return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else value


class WorkerSettings(_Settings):
    worker_id: str = _setting(
        env="WORKER_ID",
        description="unique id of this worker (default: the hostname)",
        default_factory=socket.gethostname,
    )
    host: str = _setting("0.0.0.0", env="WORKER_HOST", description="address the worker listens on")
    port: int = _setting(7000, env="WORKER_PORT", description="port the worker listens on")
    manager_url: str = _setting(
        "http://127.0.0.1:9000", env="MANAGER_URL", description="the manager (a worker may name a router instead)"
    )
    public_url: str = _setting(
        "",
        env="PUBLIC_URL",
        description="the address others must use for this worker (port forwarding, NAT; empty: http://host:port)",
    )
    heartbeat_interval_s: float = _setting(5.0, env="HEARTBEAT_INTERVAL", description="seconds between heartbeats")
    engine_start_timeout_s: float = _setting(
        900.0, env="ENGINE_START_TIMEOUT", description="seconds an engine has to become healthy before it has failed"
    )
    cpu_slots: int = _setting(
        0, env="CPU_SLOTS", description="engines a CPU-only worker runs at once (0: one per 4 GiB of memory)"
    )
    cpu_kvcache_gib: int = _setting(1, env="VLLM_CPU_KVCACHE_SPACE", description="GiB of KV cache per CPU engine")
    log_dir: str = _setting(
        env="ENGINE_LOG_DIR",
        description="directory of the engines' log files (one per engine)",
        default_factory=lambda: str(_default_state_dir() / "engines"),
    )
    engine_extra_args: list[str] = _setting(
        [],
        env="ENGINE_EXTRA_ARGS",
        description="vLLM arguments for every engine, split at whitespace (e.g. --enforce-eager on CPU)",
    )
    # An engine saturating the CPU (a CPU worker) would otherwise make the relay and heartbeats wait behind it.
    engine_nice: int = _setting(
        5, env="ENGINE_NICE", description="niceness added to engine processes, 0-19 (0: off)", ge=0, le=19
    )
    # Engine log files are rotated (worker/engine_log.py): <replica>.log, then .log.1 (newest) ... .log.N.
    engine_log_max_bytes: int = _setting(
        50 * 1024 * 1024,
        env="ENGINE_LOG_MAX_BYTES",
        description="size of an engine's log file, in bytes, at which it is rotated (0: never rotated)",
        ge=0,
    )
    engine_log_backups: int = _setting(
        3, env="ENGINE_LOG_BACKUPS", description="rotated engine log files kept (.log.1 ... .log.N)", ge=0
    )
    engine_access_log: bool = _setting(
        False,
        env="ENGINE_ACCESS_LOG",
        description="keep vLLM's own log line per request (off: --disable-uvicorn-access-log; 1/true/yes/on)",
    )

    # Issue 18: a standby has imported vLLM already; adopting it saves the API server's imports (about 10 s here).
    standby_engines: int = _setting(
        1,
        env="STANDBY_ENGINES",
        description="engine processes kept ready with vLLM imported, adopted by the next engine starts (about "
        "0.6 GB of memory each; 0: off)",
        ge=0,
    )
    cpu_engine_uniproc: bool = _setting(
        True,
        env="CPU_ENGINE_UNIPROC",
        description="CPU engines run vLLM's model worker inside its EngineCore process (one process fewer to "
        "start; 1/true/yes/on)",
    )

    @field_validator("engine_extra_args", mode="before")
    @classmethod
    def _split_args(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("engine_access_log", "cpu_engine_uniproc", mode="before")
    @classmethod
    def _truthy(cls, value: Any) -> Any:
        return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else value

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

    mode: Literal["on", "off"] = _setting(
        "on", env="SVLLM_AUTH", description="'off' disables credentials (local development only)"
    )
    api_keys_file: str | None = _setting(
        None,
        env="SVLLM_API_KEYS_FILE",
        description="file of more client keys, one per line, '#' comments (missing file: refuse to start)",
    )
    api_keys: tuple[SecretStr, ...] = _setting(
        (), env="SVLLM_API_KEYS", description="client API keys, comma list: inference and model listing"
    )
    admin_key: SecretStr | None = _setting(
        None,
        env="SVLLM_ADMIN_KEY",
        description="admin key: register, patch, delete, /workers, /status; the router's key to the manager",
    )
    worker_token: SecretStr | None = _setting(
        None, env="SVLLM_WORKER_TOKEN", description="worker join token: worker <-> manager, router -> worker"
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        mode = value.strip().lower()
        if mode not in ("on", "off"):
            raise ValueError(f"SVLLM_AUTH must be 'on' or 'off', not {mode!r}")
        return mode

    @field_validator("api_keys_file", "admin_key", "worker_token", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _add_key_file(self) -> Self:
        # After every value validated (a bad SVLLM_AUTH is reported first). A missing or unreadable file raises
        # OSError, not a validation error: fail closed, whatever the caller catches.
        keys = self.api_keys
        if self.api_keys_file:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys += tuple(SecretStr(s) for s in (line.strip() for line in lines) if s and not s.startswith("#"))
        unique = tuple({k.get_secret_value(): k for k in keys}.values())  # once each: validating a dump adds none
        if unique != self.api_keys:
            self.__dict__["api_keys"] = unique  # frozen once constructed; this is still construction
        return self

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


def _bearer(secret: SecretStr | None) -> dict[str, str]:
    return {"authorization": f"Bearer {secret.get_secret_value()}"} if secret is not None else {}


class RaySettings(_Settings):
    """`svllm ray-services`: the cluster to join and the API's address (ray_mode/services.RayServicesSettings takes
    these with the command's other flags)."""

    address: str | None = _setting(
        None,
        env="RAY_ADDRESS",
        description="Ray cluster to join (unset: a running one, else a new local one; 'local' forces a new one)",
    )
    namespace: str = _setting(
        DEFAULT_NAMESPACE, env="SVLLM_RAY_NAMESPACE", description="Ray namespace of the manager actor"
    )
    host: str = _setting("0.0.0.0", env="SERVE_HOST", description="address of the API in hybrid mode")
    port: int = _setting(8000, env="SERVE_PORT", description="port of the API in hybrid mode")
    replicas: int = _setting(
        1, env="ROUTER_REPLICAS", description="router replicas (direct ingress: at most one per node)"
    )
    ingress: Literal["direct", "proxy"] = _setting(
        "direct",
        env="SERVE_INGRESS",
        description="direct: each router replica serves the API port itself (no proxy hop); "
        "proxy: Serve's proxy on every node forwards to the replicas",
    )
    proxy_port: int = _setting(
        8001, env="SERVE_PROXY_PORT", description="port of Serve's own proxy under direct ingress (head node)"
    )

    @field_validator("address", mode="before")
    @classmethod
    def _blank_address(cls, value: Any) -> Any:
        return value or None


class CliSettings(_Settings):
    """The `svllm` command itself."""

    log_level: str = _setting("info", env="LOG_LEVEL", description="log level (debug adds a line per request)")
    router_url: str = _setting(
        "http://127.0.0.1:18000", env="ROUTER_URL", description="the router `svllm register` and `svllm status` talk to"
    )


SETTINGS_MODELS: tuple[type[_Settings], ...] = (
    ManagerSettings,
    RouterSettings,
    WorkerSettings,
    AuthSettings,
    RaySettings,
    CliSettings,
)
