"""The launches of one engine: the first spawn, the health wait, the sweep after every exit, crash restarts with
backoff, the retry of a start that lost its port, and the shutdown when the engine stops.

It drives its EngineProcess's state through the callback it is given, and owns what only it changes: the current
launch and port, the restart count, the crash history and the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from ..aio import stop_tasks
from ..schemas import ReplicaState
from . import spawn
from .engine_log import EngineLog, start_fault
from .guard import remove_dir
from .liveness import LivenessProbe
from .spawn import GUARD_GRACE_S, HOST, Launch, free_port

if TYPE_CHECKING:
    from .engine import EngineProcess

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_CRASHES = 5
CRASH_WINDOW_S = 600.0
PORT_RETRIES = 3  # a start that lost its port to another process is retried on a new port

# vLLM's ipc:// paths are the directory, "/" and a uuid4 (36): a Unix socket's path holds 107 bytes.
_RPC_DIR_MAX = 107 - 37
_PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


class EngineClient:
    """HTTP to the engine (health polls, sleep/wake): the worker's shared client, else one of its own."""

    def __init__(self, shared: httpx.AsyncClient | None) -> None:
        self._shared = shared
        self._own: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        if self._shared is not None:
            return self._shared
        if self._own is None:
            self._own = httpx.AsyncClient(timeout=5.0, trust_env=False)
        return self._own

    async def close(self) -> None:
        """Close its own client, if it made one (a later get() makes a new one); never the shared one."""
        if self._own is not None:
            await self._own.aclose()
            self._own = None


def make_rpc_dir() -> str | None:
    """A new directory for one launch's ZMQ socket files, or None where TMPDIR is so long that vLLM's socket paths
    in it would not fit (vLLM's default, TMPDIR itself, may still)."""
    made = tempfile.mkdtemp(prefix="svllm-rpc-")
    if len(made) > _RPC_DIR_MAX:
        os.rmdir(made)
        return None
    return made


def _exit_reason(returncode: int, phase: str, engine_log: EngineLog) -> str:
    reason = f"engine {spawn.describe_exit(returncode)} {phase}"
    error = engine_log.last_error()  # only this launch's own lines explain this exit
    if error is not None:
        reason += ": " + error
    return reason[:500]


class Supervisor:
    """Runs the launches of `engine`: see the module's docstring."""

    def __init__(
        self,
        engine: EngineProcess,
        *,
        set_state: Callable[[ReplicaState], None],
        engine_log: EngineLog,
        http: EngineClient,
    ) -> None:
        self._engine = engine
        self._set_state = set_state
        self._log = engine_log
        self._http = http
        self.launch: Launch | None = None
        self.port: int | None = None
        self.restarts = 0
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self._stop_event = asyncio.Event()
        self._stop_timeout = 20.0
        self._crashes: deque[float] = deque()
        self._launches = 0
        self.via_fork = False  # the current launch was forked by the fork server (fork_server.py)
        settings = engine.settings
        self._liveness = LivenessProbe(
            http.get,
            settings.engine_liveness_interval_s,
            settings.engine_liveness_timeout_s,
            settings.engine_liveness_failures,
        )

    @property
    def _name(self) -> str:
        return self._engine.replica_id

    def recent_crashes(self) -> int:
        cutoff = time.monotonic() - CRASH_WINDOW_S
        while self._crashes and self._crashes[0] < cutoff:
            self._crashes.popleft()
        return len(self._crashes)

    def fail(self, reason: str) -> None:
        self.error = reason
        log.error("engine %s failed: %s", self._name, reason)
        self._set_state(ReplicaState.FAILED)

    async def start(self) -> None:
        """Start the engine in a background task, which then polls its health and restarts it after crashes. The
        launch itself is in the task too: a fork may wait seconds for the fork server's imports, and the worker's
        loop that called this must not (its heartbeats)."""
        self.task = asyncio.create_task(self._supervise(), name=f"engine-{self._name}")

    def request_stop(self, timeout: float) -> None:
        """No more restarts; a launch spawned from now on is terminated within `timeout`."""
        self.stopping = True
        self._stop_timeout = timeout
        self._stop_event.set()

    async def shutdown(self, timeout: float) -> None:
        """After request_stop(): SIGTERM the engine's group, SIGKILL what is left after `timeout` seconds, wait
        for the supervision task, sweep any leftovers."""
        if self.launch is not None:
            await self.launch.terminate(timeout)
        if self.task is not None:
            # The supervisor sees the exit, sweeps the group through the guard and returns.
            try:
                await asyncio.wait_for(asyncio.shield(self.task), timeout=timeout + GUARD_GRACE_S + 15)
            except TimeoutError:
                self.task.cancel()
                log.error("engine %s: supervisor did not finish after stop", self._name)
        launch = self.launch  # may be newer than the one above if a restart was being spawned
        if launch is not None:
            if not launch.exited.done():
                await launch.terminate(2)
            await launch.cleanup()  # idempotent; covers a supervisor that was cancelled

    async def _spawn(self, port: int, fork_ok: bool = True) -> Launch | None:
        """The next launch, forked if it can be; None if a stop came while the fork server's imports were
        awaited (nothing started). Each launch has a directory of its own for vLLM's ZMQ socket files, which vLLM
        leaves behind (in /tmp by default: three a start, thousands on a busy worker); it goes with the launch's
        process group (Launch.rpc_dir, and the guard's sweep where the worker died)."""
        rpc_dir = make_rpc_dir()
        try:
            launch = await self._spawn_in(port, fork_ok, rpc_dir)
        except BaseException:
            if rpc_dir is not None:
                remove_dir(rpc_dir)
            raise
        if launch is None and rpc_dir is not None:
            remove_dir(rpc_dir)
        return launch

    async def _spawn_in(self, port: int, fork_ok: bool, rpc_dir: str | None) -> Launch | None:
        # Until whether it starts offline is known (worker/prefetch.py: a hub outage), or a stop comes.
        judged = asyncio.ensure_future(self._engine.hub_judged())
        stopped = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait((judged, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stop_tasks(judged, stopped)
        if self.stopping:
            return None
        self._launches += 1
        cmd = self._engine.command(port)
        env = self._engine.environment()
        if rpc_dir is not None:
            env["VLLM_RPC_BASE_PATH"] = rpc_dir
        self._log.write_launch(self._launches, cmd)
        server = self._engine.fork_server if fork_ok and cmd[1] == "-m" else None
        launch: Launch | None = None
        if server is not None:
            timeout = self._engine.settings.engine_start_timeout_s
            launch = await server.fork(
                cmd[2], cmd[3:], env, port=port, name=self._name, pump=self._log.pump, timeout=timeout,
                stop=self._stop_event, rpc_dir=rpc_dir,
            )  # fmt: skip
            if launch is None and self.stopping:
                return None
            if launch is not None:
                pid = launch.proc.pid
                self._log.write(f"[serverless-vllm: forked by the fork server, pid {pid}: {cmd[2]} imported]")
        self.via_fork = launch is not None
        if launch is None:
            launch = await spawn.launch(
                cmd,
                env,
                port=port,
                nice=self._engine.settings.engine_nice,
                pump=self._log.pump,
                name=self._name,
                rpc_dir=rpc_dir,
            )
        self.launch = launch
        self.port = port
        how = "forked" if self.via_fork else "spawned"
        log.info("engine %s: %s pid %d on port %d", self._name, how, launch.proc.pid, port)
        return launch

    async def _wait_healthy(self, launch: Launch) -> str:
        """'ready', 'exited' or 'timeout' (the engine is killed on timeout)."""
        deadline = time.monotonic() + self._engine.settings.engine_start_timeout_s
        url = f"http://{HOST}:{launch.port}/health"
        client = self._http.get()
        while True:
            done, _ = await asyncio.wait({launch.exited}, timeout=HEALTH_INTERVAL_S)
            if done or self.stopping:
                if not done:  # spawned while stop() was running: it may not know this launch
                    await launch.terminate(self._stop_timeout)
                return "exited"
            try:
                response = await client.get(url, timeout=2.0)
                if response.status_code == 200 and launch.proc.returncode is None:
                    return "ready"
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                await launch.terminate(10)
                return "timeout"

    async def _first_launch(self) -> Launch | None:
        model = self._engine.assignment.model_name
        if os.path.isabs(model) and not await asyncio.to_thread(os.path.exists, model):  # a network file system
            # vLLM would take it for a hub id and say "Repo id must be in the form 'repo_name'...", seconds later.
            self.fail(f"model path {model} does not exist on worker {self._engine.settings.worker_id}")
            return None
        try:
            return await self._spawn(free_port())
        except OSError as exc:
            self.fail(f"cannot start engine: {exc}")
            return None

    async def _supervise(self) -> None:
        try:
            await self._supervise_loop(await self._first_launch())
        except Exception as exc:  # a bug here must not leave a running-looking engine behind
            log.exception("engine %s: supervisor crashed", self._name)
            if not self.stopping:
                self.fail(f"supervisor error: {type(exc).__name__}: {exc}")
            if self.launch is not None:
                await self.launch.terminate(5)
                await self.launch.cleanup()
        if not self.stopping:
            await self._http.close()  # FAILED: no more health polls (stop() closes it otherwise)

    async def _supervise_loop(self, launch: Launch | None) -> None:
        settings = self._engine.settings
        ever_ready = False
        port_retries = 0
        while launch is not None:
            wedged: str | None = None
            outcome = await self._wait_healthy(launch)
            if outcome == "ready":
                ever_ready = True
                self.error = None
                self._engine.ready_at = time.time()
                if self._engine.state in (ReplicaState.STARTING, ReplicaState.PENDING):
                    self._set_state(ReplicaState.READY)
                health = f"http://{HOST}:{launch.port}/health"
                wedged = await self._liveness.watch(launch, health, lambda: self.stopping)
                if not self.stopping:
                    # Out of routing at once; sweeping the rest of the group can take seconds.
                    self._set_state(ReplicaState.STARTING)
                if wedged is not None and not self.stopping:
                    log.error("engine %s: %s; killing it", self._name, wedged)
                    self._log.write(f"[serverless-vllm: {wedged}; killed]")
                    await launch.terminate(2)  # a stopped process takes no SIGTERM: SIGKILL after 2 s
            returncode = launch.proc.returncode if launch.proc.returncode is not None else -1
            # Without its API server, EngineCore and Worker serve nobody: no grace for them.
            await launch.cleanup(kill_now=not self.stopping)
            if self.stopping:
                return
            if outcome == "timeout":
                self.fail(f"engine not ready within {settings.engine_start_timeout_s:.0f}s")
                return
            phase = "while serving" if outcome == "ready" else "before becoming ready"
            reason = wedged or _exit_reason(returncode, phase, self._log)
            if not ever_ready:
                if self.via_fork and not start_fault(returncode, self._log.last_error()):
                    # Whatever else failed in the forked start, the plain way is tried once before the engine fails
                    # (a refused argument or a missing model would only fail again, some 20 s of imports later).
                    log.warning("engine %s: forked start failed (%s); plain start", self._name, reason)
                    launch = await self._spawn(free_port(), fork_ok=False)
                    continue
                if port_retries < PORT_RETRIES and any(_PORT_IN_USE.search(x) for x in self._log.tail(30)):
                    port_retries += 1  # lost the port race to another process: not the engine's fault
                    launch = await self._spawn(free_port())
                    continue
                # A start that never became ready is not retried here: the manager decides.
                self.fail(reason)
                return
            self._crashes.append(time.monotonic())
            crashes = self.recent_crashes()
            self.error = reason
            if crashes >= MAX_CRASHES:
                self.fail(f"{crashes} crashes within {CRASH_WINDOW_S / 60:.0f} minutes; last: {reason}")
                return
            delay = min(BACKOFF_MAX_S, 2.0 ** (crashes - 1))
            log.warning("engine %s crashed (%s); restart in %.0fs", self._name, reason, delay)
            self._set_state(ReplicaState.STARTING)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
            if self.stopping:
                return
            self.restarts += 1
            try:
                launch = await self._spawn(spawn.pick_port(self.port))
            except OSError as exc:
                self.fail(f"cannot restart engine: {exc}")
                return
