"""The worker's settings (see the package's docstring)."""

from __future__ import annotations

import socket
from typing import Any

from pydantic import field_validator

from ..settings_base import Settings as _Settings
from ..settings_base import default_state_dir as _default_state_dir
from ..settings_base import setting as _setting
from ..settings_base import truthy as _text_switch


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
    drain_timeout_s: float = _setting(
        120.0, env="DRAIN_TIMEOUT", ge=0, description="seconds an engine leaving may finish its requests in flight"
    )
    cpu_slots: int = _setting(
        0, env="CPU_SLOTS", description="engines a CPU-only worker runs at once (0: one per 4 GiB of memory)"
    )
    hub_probe_interval_s: float = _setting(
        30.0,
        env="HUB_PROBE_INTERVAL",
        ge=0,
        description="seconds between probes of the Hugging Face hub while hub models are cached; models whole in the "
        "cache start offline while it does not answer (0: never probed)",
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

    # Issue 18: a process that has imported vLLM already; engines forked from it skip the API server's imports.
    engine_fork_server: bool = _setting(
        True,
        env="ENGINE_FORK_SERVER",
        description="a process per worker with vLLM imported, from which every engine start forks (skips the API "
        "server's imports, about 10 s of CPU; about 0.6 GB of memory, shared with the engines; 1/true/yes/on)",
    )
    cpu_engine_uniproc: bool = _setting(
        True,
        env="CPU_ENGINE_UNIPROC",
        description="CPU engines run vLLM's model worker inside its EngineCore process (one process fewer to "
        "start; 1/true/yes/on)",
    )
    cpu_engine_core_fork: bool = _setting(
        True,
        env="CPU_ENGINE_CORE_FORK",
        description="CPU engines with the model worker inside EngineCore fork that process from the API server, "
        "which has imported torch and vLLM already, instead of vLLM's spawn that imports them again (1/true/yes/on)",
    )

    # Issue 19: an engine alive but not answering (deadlocked, stopped) is killed and restarted (worker/liveness.py).
    engine_liveness_interval_s: float = _setting(
        10.0,
        env="ENGINE_LIVENESS_INTERVAL",
        description="seconds between health probes of a serving engine (0: no probes; only its exit is seen)",
        ge=0,
    )
    engine_liveness_timeout_s: float = _setting(
        10.0, env="ENGINE_LIVENESS_TIMEOUT", description="seconds one health probe of a serving engine may take", gt=0
    )
    engine_liveness_failures: int = _setting(
        3,
        env="ENGINE_LIVENESS_FAILURES",
        description="health probes failed in a row after which a serving engine is killed and restarted",
        ge=1,
    )
    engine_read_timeout_s: float = _setting(
        600.0,
        env="ENGINE_READ_TIMEOUT",
        description="longest silence, in seconds, between two reads of an engine's answer (0: no limit)",
        ge=0,
    )

    @field_validator("engine_extra_args", mode="before")
    @classmethod
    def _split_args(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("engine_access_log", "cpu_engine_uniproc", "cpu_engine_core_fork", mode="before")
    @classmethod
    def _truthy(cls, value: Any) -> Any:
        return _text_switch(value)

    def advertised_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        return f"http://{host}:{self.port}"
