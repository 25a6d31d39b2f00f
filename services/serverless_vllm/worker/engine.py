"""One vLLM OpenAI server subprocess for one replica: the state machine (start, health, crash restarts,
sleep/wake, stop, status) and the command line and environment of vLLM.

Where the work is done: supervisor.py runs the launches (health wait, crash restarts with backoff); spawn.py
starts and ends each one (its own process group, PDEATHSIG, the orphan guard of guard.py); engine_log.py keeps
its log file and tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from ..config import WorkerSettings
from ..schemas import Assignment, EngineStatus, LoadFormat, ModelTask, ReplicaState, SchedulingPolicy
from .engine_core_fork import cpu_engine_environment, fork_engine_core
from .engine_log import EngineLog
from .fork_server import ForkServer
from .spawn import HOST
from .supervisor import EngineClient, Supervisor

log = logging.getLogger(__name__)

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
_SLEEP_NEEDS_GPU = "sleep mode needs a GPU: vLLM does not support it on CPU; stop the engine instead"


# The calls that wake an engine, by the level it sleeps at: (path, query, JSON body). Level 1: its memory comes
# back, the weights copied from host memory. Level 2 discarded the weights: vLLM's own restore (vllm/snapshot/server.py)
# maps the weights' memory back, reloads them from disk (the `reload_weights` worker call, through the dev-mode
# /collective_rpc), then the KV cache, which resumes scheduling.
_WAKE_STEPS: dict[int, list[tuple[str, dict[str, str], dict[str, str] | None]]] = {
    1: [("/wake_up", {}, None)],
    2: [
        ("/wake_up", {"tags": "weights"}, None),
        ("/collective_rpc", {}, {"method": "reload_weights"}),
        ("/wake_up", {"tags": "kv_cache"}, None),
    ],
}


class EngineError(RuntimeError):
    """An operation the engine cannot do in its current state or on this machine."""


# The vLLM flags of a model's task (the worker owns them: security/models.py refuses them in extra_args).
TASK_ARGS: dict[ModelTask, list[str]] = {
    # The render endpoints (/v1/chat/completions/render, ...) are behind vLLM's scale-out switch; the engine
    # listens on loopback and the worker forwards none of the other routes it adds.
    ModelTask.GENERATE: ["--enable-scale-out"],
    ModelTask.EMBED: ["--runner", "pooling", "--convert", "embed"],
    ModelTask.CLASSIFY: ["--runner", "pooling", "--convert", "classify"],
}


# Put first on a CPU engine's PYTHONPATH: its sitecustomize runs in each of the engine's processes.
ENGINE_SITE = Path(__file__).resolve().parent / "engine_site"


def engine_environment(settings: WorkerSettings, *, has_gpu: bool) -> dict[str, str]:
    """The environment of every engine of this worker (the fork server's too): what differs per engine comes on
    top."""
    env = dict(os.environ)  # HF_HUB_OFFLINE, HF_HOME, tokens ... pass through as the operator set them
    env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they are written, not at exit
    # Stored Responses (GET /v1/responses/{id}, previous_response_id): off by default in vLLM, which then
    # ignores `store` silently. The store lives in the engine's memory and is never trimmed by vLLM: it goes
    # with the engine (scale to zero, restart); the router knows which replica holds which id.
    env.setdefault("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    if has_gpu:
        # /sleep and /wake_up exist only in vLLM's dev mode; the engine listens on loopback only.
        env["VLLM_SERVER_DEV_MODE"] = "1"
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_gib))
        # Every process of the engine asks Linux for the AMX state vLLM's CPU attention uses without asking for it
        # (engine_site/sitecustomize.py: else SIGILL at the first request on CPUs with AMX).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_SITE), env.get("PYTHONPATH", "")) if p)
        if settings.cpu_engine_core_fork:
            cpu_engine_environment(env)  # the libraries vLLM preloads for its EngineCore, which is forked
    return env


async def _nothing_to_wait_for() -> None:
    return None


class EngineProcess:
    """Launches and supervises one vLLM OpenAI server for one Assignment.

    States: STARTING -> READY (GET /health == 200); exit before READY -> FAILED (the manager decides about
    retries); crash after READY -> restart with backoff 1, 2, 4 ... 30 s, FAILED after 5 crashes in 10 min;
    READY <-> SLEEPING on GPU workers; stop() -> STOPPING, after which the worker drops the object.
    """

    def __init__(
        self,
        assignment: Assignment,
        settings: WorkerSettings,
        *,
        has_gpu: bool,
        on_change: Callable[[], None] | None = None,
        client: httpx.AsyncClient | None = None,
        fork_server: ForkServer | None = None,
        hub_offline: Callable[[], bool] = lambda: False,
        hub_judged: Callable[[], Awaitable[None]] = _nothing_to_wait_for,
    ) -> None:
        self.assignment = assignment
        # Asked at each launch (crash restarts too): its model whole in the cache, the hub not answering (prefetch.py)
        self.hub_offline = hub_offline
        self.hub_judged = hub_judged  # awaited before each launch: until hub_offline can be believed (prefetch.py)
        self.fork_server = fork_server  # starts fork from it when it is there (fork_server.py)
        self.settings = settings
        self.has_gpu = has_gpu
        self._on_change = on_change
        self._http = EngineClient(client)
        self._state = ReplicaState.STARTING
        self._changed = asyncio.Event()
        self._log = EngineLog(assignment.replica_id, settings.engine_log_max_bytes, settings.engine_log_backups)
        self._runs = Supervisor(self, set_state=self._set_state, engine_log=self._log, http=self._http)
        self._stopped = False
        self._stop_task: asyncio.Task[None] | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.sleep_level: int | None = None  # the level of its last sleep (level 2: a wake reloads the weights)

    # ------------------------------------------------------------------ read-only view

    @property
    def replica_id(self) -> str:
        return self.assignment.replica_id

    @property
    def alias(self) -> str:
        return self.assignment.alias

    @property
    def state(self) -> ReplicaState:
        return self._state

    @property
    def port(self) -> int | None:
        return self._runs.port

    @property
    def pid(self) -> int | None:
        launch = self._runs.launch
        if launch is None or launch.proc.returncode is not None:
            return None
        return launch.proc.pid

    @property
    def restarts(self) -> int:
        return self._runs.restarts

    @property
    def error(self) -> str | None:
        return self._runs.error

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def sleep_supported(self) -> bool:
        # vLLM refuses --enable-sleep-mode on CPU ("not supported on current platform").
        return self.has_gpu

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def log_path(self) -> Path:
        return Path(self.settings.log_dir) / f"{self.replica_id}.log"

    def log_tail(self, n: int = 50) -> list[str]:
        return self._log.tail(n)

    def status(self) -> EngineStatus:
        # The tail rides along only when someone needs to see why: a failure, or a recent crash.
        show_tail = self._state == ReplicaState.FAILED or self._runs.recent_crashes() > 0
        return EngineStatus(
            replica_id=self.replica_id,
            alias=self.alias,
            state=self._state,
            gpus=list(self.assignment.gpus),
            model_name=self.assignment.model_name,
            port=self.port,
            pid=self.pid,
            restarts=self.restarts,
            error=self.error,
            log_tail=self.log_tail(50) if show_tail else [],
            sleep_level=self.sleep_level if self._state is ReplicaState.SLEEPING else None,
        )

    # ------------------------------------------------------------------ command and environment

    @property
    def uniproc(self) -> bool:
        """vLLM's model worker inside the EngineCore process: on CPU with one rank, unless the operator chose an
        executor. vLLM's CPU platform spawns its processes, each importing torch and vLLM again: one process fewer
        saves one import (about 7 s here) and its memory; metrics, aborts and crash detection are the API server's
        and unchanged. The one left, EngineCore, is forked instead (CPU_ENGINE_CORE_FORK, engine_core_fork.py)."""
        engine = self.assignment.engine
        chosen = "--distributed-executor-backend" in [*self.settings.engine_extra_args, *engine.extra_args]
        return not self.has_gpu and self.settings.cpu_engine_uniproc and engine.tensor_parallel_size == 1 and not chosen

    def command(self, port: int) -> list[str]:
        engine = self.assignment.engine
        cmd = [
            sys.executable, "-m", ENGINE_MODULE,
            "--model", self.assignment.model_name,
            "--served-model-name", self.alias,
            "--host", HOST,
            "--port", str(port),
            "--dtype", engine.dtype,
            "--tensor-parallel-size", str(engine.tensor_parallel_size),
        ]  # fmt: skip
        if engine.max_model_len is not None:
            cmd += ["--max-model-len", str(engine.max_model_len)]
        if engine.load_format is not LoadFormat.AUTO:
            cmd += ["--load-format", engine.load_format.value]
        if engine.revision is not None:
            cmd += ["--revision", engine.revision]
        cmd += TASK_ARGS[engine.task]
        if engine.scheduling_policy is SchedulingPolicy.PRIORITY:
            cmd += ["--scheduling-policy", "priority"]
        if engine.enable_lora:
            cmd += [
                "--enable-lora",
                "--max-loras", str(engine.max_loras),
                "--max-lora-rank", str(engine.max_lora_rank),
                "--max-cpu-loras", str(engine.max_cpu_loras or engine.max_loras),
            ]  # fmt: skip
        if self.has_gpu:
            cmd += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization), "--enable-sleep-mode"]
        if self.uniproc:
            cmd += ["--distributed-executor-backend", "uni"]
        if not self.settings.engine_access_log:
            # vLLM's line per request would fill the engine's log (the router counts requests). Before the extra
            # arguments: a --no-disable-uvicorn-access-log there comes later and wins.
            cmd.append("--disable-uvicorn-access-log")
        return cmd + list(self.settings.engine_extra_args) + list(engine.extra_args)

    def environment(self) -> dict[str, str]:
        env = engine_environment(self.settings, has_gpu=self.has_gpu)
        if self.has_gpu and self.assignment.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.assignment.gpus)
            # NVML numbers GPUs by PCI bus; CUDA's default order may differ. Make them agree.
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        if self.uniproc:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vLLM's CPU platform refuses 'uni' without it
            if self.settings.cpu_engine_core_fork:
                fork_engine_core(env)  # EngineCore forked from the imported API server (engine_core_fork.py)
        if self.hub_offline():
            env["HF_HUB_OFFLINE"] = "1"  # online, vLLM would retry the hub for minutes, then fail
        if self.assignment.engine.enable_lora:
            # The runtime adapter API (worker/adapters.py); on loopback, and the worker relays no such route.
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the engine and return: its launch, health polling and crash restarts run in a background task."""
        if self._runs.task is not None or self._runs.stopping:
            raise EngineError(f"engine {self.replica_id} was already started")
        self.started_at = time.time()
        self._set_state(ReplicaState.STARTING)
        self._log.open(self.log_path)
        await self._runs.start()

    async def wait_ready(self, timeout: float) -> bool:
        """True once READY; False on FAILED, stop, or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self._state == ReplicaState.READY:
                return True
            if self._state == ReplicaState.FAILED or self._runs.stopping:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def stop(self, timeout: float = 20) -> None:
        """SIGTERM the engine's process group, SIGKILL what is left after `timeout` seconds."""
        if self._stop_task is None:  # every caller waits for the one and only shutdown
            self._stop_task = asyncio.create_task(self._stop(timeout), name=f"stop-{self.replica_id}")
        await asyncio.shield(self._stop_task)

    async def _stop(self, timeout: float) -> None:
        self._runs.request_stop(timeout)
        self._set_state(ReplicaState.STOPPING)
        await self._runs.shutdown(timeout)
        self._log.close()
        await self._http.close()
        self._stopped = True
        self._changed.set()

    async def sleep(self, level: int = 1) -> None:
        """Put a READY engine to sleep (GPU only), freeing its GPU memory: level 1 offloads the weights to host
        memory, level 2 discards them (the manager chooses: manager/sleep_level.py)."""
        if not self.sleep_supported:
            raise EngineError(_SLEEP_NEEDS_GPU)
        # Checked on a copy: narrowed, self._state itself would look unchangeable across the await to mypy.
        if (state := self._state) != ReplicaState.READY:
            raise EngineError(f"engine {self.replica_id} is {state}, not ready: cannot sleep")
        response = await self._http.get().post(f"{self.base_url}/sleep", params={"level": level}, timeout=120)
        if response.status_code != 200:
            raise EngineError(f"engine refused to sleep: HTTP {response.status_code} {response.text[:300]}")
        self.sleep_level = level
        if self._state == ReplicaState.READY:  # not if it crashed or was stopped meanwhile
            self._set_state(ReplicaState.SLEEPING)

    async def wake(self) -> None:
        """Wake a SLEEPING engine (GPU only)."""
        if not self.sleep_supported:
            raise EngineError(_SLEEP_NEEDS_GPU)
        if (state := self._state) != ReplicaState.SLEEPING:  # a copy, as in sleep()
            raise EngineError(f"engine {self.replica_id} is {state}, not sleeping: cannot wake")
        self._set_state(ReplicaState.WAKING)
        try:
            for path, params, body in _WAKE_STEPS[self.sleep_level or 1]:
                response = await self._http.get().post(f"{self.base_url}{path}", params=params, json=body, timeout=300)
                if response.status_code != 200:
                    raise EngineError(
                        f"engine refused to wake ({path}): HTTP {response.status_code} {response.text[:300]}"
                    )
        except (httpx.HTTPError, EngineError):
            if self._state == ReplicaState.WAKING:
                self._set_state(ReplicaState.SLEEPING)
            raise
        self.sleep_level = None
        if self._state == ReplicaState.WAKING:
            self._set_state(ReplicaState.READY)

    # ------------------------------------------------------------------ state changes

    def _set_state(self, state: ReplicaState) -> None:
        if state == self._state:
            return
        log.info("engine %s (%s): %s -> %s", self.replica_id, self.alias, self._state, state)
        self._state = state
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("engine %s: on_change callback failed", self.replica_id)
