"""The worker's control loop: register, heartbeat, and make the running engines match the manager's assignments."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import httpx

from .. import __version__
from ..aio import stop_tasks, wait_event
from ..config import WorkerSettings
from ..manager.http_client import HTTPManagerClient
from ..metrics.worker import WorkerMetrics
from ..schemas import Assignment, EngineStatus, GPUInfo, Heartbeat, HeartbeatReply, ReplicaState, WorkerRegistration
from .adapter_fetch import AdapterFetcher
from .adapters import AdapterSync
from .drain import Drainer, InFlight
from .engine import ENGINE_MODULE, EngineProcess, engine_environment
from .fork_server import ForkServer
from .gpus import GPUProbe, cpu_slots
from .host_memory import WeightSizes, host_memory, weights_bytes
from .prefetch import Prefetcher

log = logging.getLogger(__name__)

FORK_SERVER_QUIET_S = 2.0  # no request for this long before the fork server is launched
PROGRESS_NOTE_S = 30.0  # seconds between two "still starting" lines of one engine


class WorkerAgent:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        probe: GPUProbe | None = None,
        manager: HTTPManagerClient | None = None,
        engine_client: httpx.AsyncClient | None = None,
        manager_headers: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._probe = probe or GPUProbe()
        self.metrics = WorkerMetrics(self._probe, lambda: self.engines.values())
        self._manager = manager or HTTPManagerClient(settings.manager_url, headers=manager_headers)
        self._engine_client = engine_client
        self.engines: dict[str, EngineProcess] = {}
        self.gpus: list[GPUInfo] = []
        self._apply_lock = asyncio.Lock()
        self._nudge = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self.registered = False
        self.fork_server: ForkServer | None = None  # made at start(), once the GPUs are known
        self._starting: dict[str, tuple[float, float]] = {}  # replica -> (seen starting since, last progress line)
        self._weights = WeightSizes()  # each engine's weights on disk: the manager chooses sleep levels with them
        # The hub models the manager wants in this worker's cache before an engine needs them (prefetch.py).
        self.prefetcher = Prefetcher(
            on_change=self._nudge.set,
            on_done=self.metrics.prefetch_done,
            on_hub=self.metrics.hub_changed,
            probe_interval_s=settings.hub_probe_interval_s,
        )
        # Requests in flight per engine, counted by the relay (app.py): an engine leaving drains them (drain.py).
        self.inflight = InFlight()
        self.draining = Drainer(self.inflight, settings.drain_timeout_s, on_gone=self.nudge)
        self.leaving = False  # shutting down (leave()): every engine drains, none starts
        self._assigned: dict[str, Assignment] = {}  # the manager's latest assignments, by replica id
        self._no_room: set[str] = set()  # assigned, waiting for engines draining on their GPUs to exit
        # LoRA adapters loaded into (and unloaded from) engines as their assignments say (adapters.py); hub ones
        # fetched by the worker, offline while the hub watch finds the hub down (adapter_fetch.py).
        fetcher = AdapterFetcher(hub_down=lambda: self.prefetcher.hub.down)
        self.adapters = AdapterSync(on_change=self._nudge.set, fetcher=fetcher)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.gpus = self._probe.detect()
        log.info(
            "worker %s: %s",
            self.settings.worker_id,
            f"{len(self.gpus)} GPU(s)" if self.gpus else f"CPU-only, {cpu_slots(self.settings)} engine slot(s)",
        )
        self.fork_server = ForkServer(
            self.settings.engine_fork_server,
            lambda: engine_environment(self.settings, has_gpu=self.has_gpu),
            nice=self.settings.engine_nice,
            busy=self.fork_server_must_wait,
            module=ENGINE_MODULE,
        )
        self.fork_server.start()
        self._loop = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")

    async def stop(self) -> None:
        await stop_tasks(self._loop)
        await self.draining.close()
        await self.adapters.close()
        await asyncio.gather(*(e.stop() for e in self.engines.values()), return_exceptions=True)
        self.engines.clear()
        if self.fork_server is not None:
            await self.fork_server.stop()
        await self.prefetcher.close()
        await self._manager.close()

    def fork_server_must_wait(self) -> bool:
        """The fork server's imports take seconds of CPU: not while an engine starts (a plain start, since there is
        no server yet), nor while engines serve (on a CPU worker they would share the cores with the requests)."""
        starting = any(e.state is ReplicaState.STARTING for e in self.engines.values())
        return starting or self.inflight.quiet_for() < FORK_SERVER_QUIET_S

    def nudge(self) -> None:
        """An engine changed state: tell the manager now rather than at the next beat."""
        self._nudge.set()
        if self.fork_server is not None:
            self.fork_server.nudge()  # a start that ended may let a fork server that died be replaced
        self.metrics.engines_changed(self.engines.values())  # crashes, restarts, start times
        self.adapters.refresh(self.engines)  # a restarted engine holds no adapter: loaded again once ready

    # ------------------------------------------------------------------ manager link

    def statuses(self) -> list[EngineStatus]:
        out = []
        self._weights.keep(self.engines)
        for engine in self.engines.values():
            status = engine.status()
            status.gpus = engine.assignment.gpus
            status.model_name = engine.assignment.model_name
            if engine.assignment.engine.enable_lora:
                status.lora = True
                status.adapters = self.adapters.loaded(engine.replica_id)
                status.adapter_errors = self.adapters.errors(engine.replica_id)
            if self.has_gpu:  # only sleep needs it, and only GPU workers sleep
                status.weights_bytes = self._weights.of(engine.replica_id, engine.state, _measure(engine))
            out.append(status)
        return out + self.draining.statuses()

    def registration(self) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=self.settings.worker_id,
            url=self.settings.advertised_url(),
            gpus=self.gpus,
            cpu_slots=0 if self.gpus else cpu_slots(self.settings),
            sleep_supported=self.has_gpu,
            engines=self.statuses(),
            version=__version__,
            host_memory=host_memory(),
            cache=self.prefetcher.statuses(),
        )

    async def _heartbeat_loop(self) -> None:
        delay = 1.0
        while True:
            try:
                if not self.registered:
                    reply = await self._manager.register_worker(self.registration())
                    self.registered = True
                    log.info("registered with the manager at %s", self.settings.manager_url)
                else:
                    beat = Heartbeat(
                        worker_id=self.settings.worker_id,
                        gpus=self._probe.sample(),
                        engines=self.statuses(),
                        host_memory=host_memory(),
                        cache=self.prefetcher.statuses(),
                        leaving=self.leaving,
                    )
                    reply = await self._manager.heartbeat(beat)
                await self._handle(reply)
                self.note_progress(time.monotonic())
                delay = 1.0
                await wait_event(self._nudge, self.settings.heartbeat_interval_s)
                self._nudge.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The manager is away (restart, network): engines keep serving; keep trying.
                log.warning("manager unreachable (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.heartbeat_interval_s)

    async def _handle(self, reply: HeartbeatReply) -> None:
        if reply.reregister:
            if self.leaving:
                return  # shutting down: nothing to take on again
            log.info("manager does not know this worker (it restarted?): registering again")
            self.registered = False
            self.nudge()
            return
        await self.apply(reply.assignments)
        self.prefetcher.update(reply.prefetch)

    def note_progress(self, now: float) -> None:
        """A line every PROGRESS_NOTE_S for each engine still starting, with the last line of its own log: a start
        takes half a minute on a CPU and minutes for a large model, and a silent one looks stuck."""
        starting = {rid: e for rid, e in self.engines.items() if e.state is ReplicaState.STARTING}
        self._starting = {rid: self._starting.get(rid, (now, now)) for rid in starting}
        for rid, engine in starting.items():
            since, noted = self._starting[rid]
            if now - noted < PROGRESS_NOTE_S:
                continue
            self._starting[rid] = (since, now)
            last = engine.log_tail(1)
            log.info(
                "engine %s (%s): still starting after %.0f s%s",
                rid,
                engine.alias,
                now - since,
                f"; its log: {last[-1].strip()[:200]}" if last else "",
            )

    # ------------------------------------------------------------------ desired state

    async def apply(self, assignments: list[Assignment]) -> list[EngineStatus]:
        """Start what is assigned and missing, drain then stop what runs and is not assigned (drain.py), sleep or
        wake as asked."""
        async with self._apply_lock:
            wanted = {a.replica_id: a for a in assignments}
            self._assigned = wanted
            # Before any launch: each finds its hub model's check begun (Prefetcher.judged).
            self.prefetcher.running((a.model_name, a.engine.revision) for a in assignments)
            self._no_room &= wanted.keys()
            for rid in [rid for rid in self.engines if rid not in wanted]:
                self.draining.drain(self.engines.pop(rid))  # out of service now, stopped once idle
            for rid, assignment in wanted.items():
                running = self.engines.get(rid)
                if running is None:
                    if self.leaving or rid in self.draining.engines or not self._room(assignment):
                        continue
                    engine = EngineProcess(
                        assignment,
                        self.settings,
                        has_gpu=self.has_gpu,
                        on_change=self.nudge,
                        client=self._engine_client,
                        fork_server=self.fork_server,
                        hub_offline=partial(self.prefetcher.offline, assignment.model_name, assignment.engine.revision),
                        hub_judged=partial(self.prefetcher.judged, assignment.model_name, assignment.engine.revision),
                    )
                    self.engines[rid] = engine
                    self.metrics.engine_started(engine)
                    log.info(
                        "starting engine %s: %s as %s (its log: %s)",
                        rid,
                        assignment.model_name,
                        assignment.alias,
                        engine.log_path,
                    )
                    await engine.start()
                elif assignment.asleep and running.state is ReplicaState.READY:
                    # Out of routing since the manager chose to: asleep once its requests in flight are done.
                    self.draining.sleep_when_idle(running, assignment.sleep_level, partial(self._asleep, rid))
                elif not assignment.asleep and running.state is ReplicaState.SLEEPING:
                    self._spawn(running.wake())
            self.adapters.update(self.engines, wanted)
            return self.statuses()

    def _room(self, assignment: Assignment) -> bool:
        """Whether its GPUs have room now: not while engines draining there hold the memory it needs."""
        rid = assignment.replica_id
        if self.draining.room_for(assignment, self.engines.values()):
            self._no_room.discard(rid)
            return True
        if rid not in self._no_room:
            self._no_room.add(rid)
            gpus = ",".join(map(str, assignment.gpus))
            log.info("engine %s (%s) waits for the engines draining on GPU(s) %s to exit", rid, assignment.alias, gpus)
        return False

    def _asleep(self, replica_id: str) -> bool:
        """Whether the manager still wants this replica asleep."""
        assignment = self._assigned.get(replica_id)
        return assignment is not None and assignment.asleep

    async def leave(self) -> None:
        """The worker's own shutdown (SIGTERM): tell the manager (its replicas leave routing and are placed elsewhere),
        let the requests in flight finish (at most DRAIN_TIMEOUT), stop every engine, say so, and stop beating."""
        self.leaving = True
        for rid in list(self.engines):
            self.draining.drain(self.engines.pop(rid))
        self.nudge()  # a heartbeat now: the manager takes this worker out of routing and placement
        await self.draining.wait()
        await stop_tasks(self._loop)
        beat = Heartbeat(worker_id=self.settings.worker_id, engines=[], leaving=True)
        try:
            await self._manager.heartbeat(beat)  # the last word: nothing runs here any more
        except Exception as exc:
            log.warning("could not tell the manager this worker left (%s): it will find out", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def ready_engine(self, alias: str | None, replica_id: str | None) -> EngineProcess | None:
        """The engine to serve a request: the replica the router chose, else any ready one of the alias."""
        if replica_id:
            engine = self.engines.get(replica_id)
            if engine is not None and engine.state is ReplicaState.READY:
                return engine
        for engine in self.engines.values():
            if engine.alias == alias and engine.state is ReplicaState.READY:
                return engine
        return None


def _measure(engine: EngineProcess) -> Callable[[], int | None]:
    a = engine.assignment
    return lambda: weights_bytes(a.model_name, engine.environment(), a.engine.revision)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine operation failed: %s", task.exception())
