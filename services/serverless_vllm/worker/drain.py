"""Draining on the worker: an engine leaves without cutting the requests it serves.

An engine the manager no longer assigns (scale-down, eviction, model delete: manager/draining.py) or that the
worker's own shutdown ends (SIGTERM, worker/shutdown.py) is taken out of service at once: no new request reaches it
(the worker answers `replica_unavailable` and the router retries elsewhere before any byte was sent). The requests
in flight there keep streaming until they are done, or until DRAIN_TIMEOUT has passed, and only then is the engine
stopped; it is reported `stopping` meanwhile, and gone once its processes have exited. A new engine whose GPUs do not
have room beside the engines draining there starts only after those have exited, so their memory is free.

The worker counts the requests in flight of each engine itself (`InFlight`): it relays every one of them, from the
request to the last byte of the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from ..schemas import Assignment, EngineStatus, ReplicaState
from .engine import EngineProcess

log = logging.getLogger(__name__)

_EPS = 1e-6  # GPU memory fractions are floats: 0.3 + 0.3 + 0.4 fits one GPU


class InFlight:
    """Requests in flight per engine (replica id), as the worker relays them."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}  # replica id -> set when its count falls to 0 (waiters only)
        self._last_end = 0.0  # monotonic time the last request ended

    def enter(self, replica_id: str) -> None:
        """Count one request; the caller calls leave() once when it ends."""
        self._counts[replica_id] = self._counts.get(replica_id, 0) + 1

    def leave(self, replica_id: str) -> None:
        self._last_end = time.monotonic()
        left = self._counts[replica_id] - 1
        if left:
            self._counts[replica_id] = left
            return
        del self._counts[replica_id]
        if (idle := self._idle.pop(replica_id, None)) is not None:
            idle.set()

    def count(self, replica_id: str) -> int:
        return self._counts.get(replica_id, 0)

    def quiet_for(self) -> float:
        """Seconds since the last request of any engine ended; 0 while one is in flight."""
        return 0.0 if self._counts else time.monotonic() - self._last_end

    async def wait_idle(self, replica_id: str, timeout: float) -> bool:
        """Wait until the engine has no request in flight; False if `timeout` seconds passed first."""
        if not self._counts.get(replica_id):
            return True
        idle = self._idle.setdefault(replica_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await idle.wait()
        except TimeoutError:
            return False
        return True


class Drainer:
    """The engines being drained, each stopped once its requests in flight are done or the drain timeout passed.

    `on_gone`: called after each one has stopped (the worker tells the manager at once, which then frees its GPUs).
    """

    def __init__(self, inflight: InFlight, timeout_s: float, on_gone: Callable[[], None]) -> None:
        self._inflight = inflight
        self._timeout = timeout_s
        self._on_gone = on_gone
        self.engines: dict[str, EngineProcess] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sleeps: dict[str, asyncio.Task[None]] = {}  # engines to put to sleep once idle

    def drain(self, engine: EngineProcess) -> None:
        """Out of service now; stopped once idle (or at the drain timeout)."""
        rid = engine.replica_id
        self.engines[rid] = engine
        self._tasks[rid] = asyncio.create_task(self._drain(engine), name=f"drain-{rid}")

    async def _drain(self, engine: EngineProcess) -> None:
        rid = engine.replica_id
        try:
            await self._settle(engine, "stopping")
            log.info("stopping engine %s (%s)", rid, engine.alias)
            await engine.stop()
        except Exception:
            log.exception("engine %s: drain failed", rid)
        finally:
            self.engines.pop(rid, None)
            self._tasks.pop(rid, None)
            self._on_gone()

    async def _settle(self, engine: EngineProcess, then: str) -> None:
        """Wait for the engine's requests in flight, at most the drain timeout, saying what happens."""
        rid, busy = engine.replica_id, self._inflight.count(engine.replica_id)
        if not busy:
            return
        began = time.monotonic()
        log.info(
            "engine %s (%s): draining %d request(s) in flight, at most %.0f s", rid, engine.alias, busy, self._timeout
        )
        if await self._inflight.wait_idle(rid, self._timeout):
            log.info("engine %s drained in %.1f s", rid, time.monotonic() - began)
        else:
            log.warning(
                "engine %s: %d request(s) still in flight after the drain timeout (%.0f s): %s it anyway",
                rid,
                self._inflight.count(rid),
                self._timeout,
                then,
            )

    def sleep_when_idle(self, engine: EngineProcess, level: int, still_wanted: Callable[[], bool]) -> None:
        """Put a ready engine to vLLM sleep once its requests in flight are done (the manager took it out of routing
        as it chose to): at most the drain timeout later, and only if the manager still wants it asleep then."""
        rid = engine.replica_id
        if rid in self._sleeps:
            return

        async def sleep() -> None:
            await self._settle(engine, "putting to sleep")
            if still_wanted() and engine.state is ReplicaState.READY and not engine.stopped:
                await engine.sleep(level)

        task = asyncio.create_task(sleep(), name=f"sleep-{rid}")
        self._sleeps[rid] = task
        task.add_done_callback(lambda t: _log_failure(self._sleeps, rid, t))

    def statuses(self) -> list[EngineStatus]:
        """The engines draining, as the heartbeat reports them: stopping (out of routing, not to be adopted)."""
        out = []
        for engine in self.engines.values():
            status = engine.status()
            status.state = ReplicaState.STOPPING
            status.gpus = list(engine.assignment.gpus)
            status.model_name = engine.assignment.model_name
            out.append(status)
        return out

    def room_for(self, assignment: Assignment, running: Iterable[EngineProcess]) -> bool:
        """Whether the new engine may start now: yes unless it shares a GPU with an engine being drained and that GPU
        lacks room for it beside every engine holding it (their memory is freed when they exit)."""
        draining = [e.assignment for e in self.engines.values()]
        shared = {g for a in draining for g in a.gpus} & set(assignment.gpus)
        if not shared:
            return True
        holders = [*draining, *(e.assignment for e in running)]
        need = assignment.engine.gpu_memory_utilization
        return all(
            sum(h.engine.gpu_memory_utilization for h in holders if g in h.gpus) + need <= 1.0 + _EPS for g in shared
        )

    async def wait(self) -> None:
        """Until every engine being drained has stopped."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        """The worker stops: no more waiting, every engine being drained is stopped now."""
        engines = list(self.engines.values())
        for task in [*self._tasks.values(), *self._sleeps.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *self._sleeps.values(), return_exceptions=True)
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)
        self.engines.clear()


def _log_failure(tasks: dict[str, asyncio.Task[None]], rid: str, task: asyncio.Task[None]) -> None:
    tasks.pop(rid, None)
    if not task.cancelled() and task.exception() is not None:
        log.error("engine %s: sleep failed: %s", rid, task.exception())
