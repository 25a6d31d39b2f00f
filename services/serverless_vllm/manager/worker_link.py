"""Everything the manager says to workers: their assignment lists, pushed when they change and returned in every
heartbeat reply, and the probe of a worker a router could not reach.

The only module of the manager that does network I/O (httpx): the rest of the manager is transport-free.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Protocol

import httpx

from ..config import AuthSettings, ManagerSettings
from ..schemas import Assignment, EngineArgs, HeartbeatReply, PrefetchOrder, WorkerState
from .registry import ModelRecord, ModelRegistry
from .replicas import ReplicaIndex
from .workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

# The client the manager calls workers with (the core's constructor takes one, for tests and benchmarks).
WorkerClient = httpx.AsyncClient

# What can differ between two versions of a worker's assignments: (replica id, asleep) of each replica, in
# list order (a replica's sleep level is chosen as it is put to sleep and kept until it is woken: `asleep` changes
# with it). A replica's alias, GPUs, model and engine are fixed for its id (PATCH changes policy only), so
# equal keys mean equal assignment lists; comparing keys replaces building and hashing every worker's
# serialized assignments on each pass. What a worker accepted is remembered as the set (PushedKey): the
# order of a list does not matter to the worker, so a reordering alone is not pushed again.
# The LoRA adapters a replica should hold (manager/adapters.py) are part of its key.
AssignmentKey = tuple[tuple[str, bool, tuple[str, ...]], ...]
PushedKey = frozenset[tuple[str, bool, tuple[str, ...]]]
# The hub models a worker should have in its cache, as (model name, revision) (manager/model_cache.py).
PrefetchKey = tuple[tuple[str, str | None], ...]

# Seconds one probe of a worker's /health may take (a slow answer is not a refusal: heartbeats decide).
PROBE_TIMEOUT_S = 2.0


class AdapterAssignments(Protocol):
    """What assignments say about LoRA adapters (manager/adapters.py)."""

    def engine(self, alias: str, model: ModelRecord) -> EngineArgs: ...

    def key(self, replica_id: str) -> tuple[str, ...]: ...

    def assigned(self, replica_id: str) -> dict[str, str]: ...


class _NoAdapters:
    def engine(self, alias: str, model: ModelRecord) -> EngineArgs:
        return model.engine()

    def key(self, replica_id: str) -> tuple[str, ...]:
        return ()

    def assigned(self, replica_id: str) -> dict[str, str]:
        return {}


class WorkerLink:
    def __init__(
        self,
        settings: ManagerSettings,
        registry: ModelRegistry,
        replicas: ReplicaIndex,
        workers: WorkerRegistry,
        *,
        on_refused: Callable[[WorkerRecord], None],
        client: WorkerClient | None = None,
        worker_headers: dict[str, str] | None = None,
        prefetch: Callable[[str], PrefetchKey] = lambda worker_id: (),
        adapters: AdapterAssignments | None = None,
    ) -> None:
        """`on_refused`: called with a worker that refused every probe's connection (declared dead). `prefetch`:
        the models a worker should have in its cache (its heartbeat replies carry them)."""
        self._settings = settings
        self._models = registry.models
        self._replicas = replicas
        self._workers = workers
        self._on_refused = on_refused
        self._prefetch = prefetch
        self._adapters = adapters if adapters is not None else _NoAdapters()
        self._client = client
        # Calls to workers carry the worker token; adapters that pass none (the Ray actor) take it from the env.
        self._worker_headers = AuthSettings.from_env().worker_headers() if worker_headers is None else worker_headers
        self._pushed: dict[str, PushedKey] = {}  # worker id -> the assignments it last accepted
        # worker id -> (keys, reply): a heartbeat reply is rebuilt only when that worker's assignments (or prefetch
        # orders) change.
        self._replies: dict[str, tuple[tuple[AssignmentKey, PrefetchKey], HeartbeatReply]] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}  # worker id -> its probe under way (one at a time)
        self._pushes: dict[str, asyncio.Task[None]] = {}  # worker id -> its push under way (one at a time)

    def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._settings.worker_timeout_s, limits=httpx.Limits(max_connections=200)
            )

    async def close(self) -> None:
        for task in [*self._probes.values(), *self._pushes.values()]:
            task.cancel()  # a probe waits up to seconds between its attempts: not past the client's life
        await asyncio.gather(*self._probes.values(), *self._pushes.values(), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ assignments

    def assignments(self, worker_id: str) -> list[Assignment]:
        out = []
        for r in self._replicas.of_worker(worker_id):
            model = self._models.get(r.alias)
            if model is not None and r.draining_since is None:  # one not assigned any more is drained by its worker
                out.append(
                    Assignment(
                        replica_id=r.replica_id,
                        alias=r.alias,
                        model_name=model.spec.model_name,
                        engine=self._adapters.engine(r.alias, model),
                        gpus=r.gpus,
                        asleep=r.asleep,
                        sleep_level=r.sleep_level,
                        adapters=self._adapters.assigned(r.replica_id),
                    )
                )
        return out

    def assignment_key(self, worker_id: str) -> AssignmentKey:
        """What identifies the worker's assignments (see AssignmentKey), in O(its replicas)."""
        key = self._adapters.key
        return tuple(
            (r.replica_id, r.asleep, key(r.replica_id))
            for r in self._replicas.of_worker(worker_id)
            if r.alias in self._models and r.draining_since is None
        )

    def reply(self, record: WorkerRecord) -> HeartbeatReply:
        """The worker's assignments; the reply object is reused until they change (callers must not mutate it)."""
        key = self.assignment_key(record.worker_id)
        orders = self._prefetch(record.worker_id)
        cached = self._replies.get(record.worker_id)
        if cached is None or cached[0] != (key, orders):
            prefetch = [PrefetchOrder(model_name=model, revision=revision) for model, revision in orders]
            cached = ((key, orders), HeartbeatReply(assignments=self.assignments(record.worker_id), prefetch=prefetch))
            self._replies[record.worker_id] = cached
        self._pushed[record.worker_id] = frozenset(key)
        return cached[1]

    def cached_reply(self, worker_id: str) -> HeartbeatReply | None:
        """The reply the worker's heartbeats get until its assignments change, if one was built."""
        cached = self._replies.get(worker_id)
        return cached[1] if cached else None

    def pushed(self, worker_id: str) -> PushedKey | None:
        """The assignments the worker last accepted (by push or in a heartbeat reply), as a key."""
        return self._pushed.get(worker_id)

    def forget(self, worker_id: str) -> None:
        """The worker is dead (or forgotten): what it accepted no longer counts (it registers again with what it
        runs)."""
        self._pushed.pop(worker_id, None)
        self._replies.pop(worker_id, None)

    async def push_assignments(self) -> None:
        """Push each changed worker's assignments, in the background: a hung worker (it accepts, never answers) costs
        its own push the worker timeout, not the reconcile pass of every other model. One push per worker at a
        time; a change made meanwhile goes in the next pass's push (and in every heartbeat reply)."""
        for record in self._workers.all():
            worker_id = record.worker_id
            if record.state is WorkerState.DEAD or worker_id in self._pushes:
                continue
            key = frozenset(self.assignment_key(worker_id))
            if self._pushed.get(worker_id) != key:
                task = asyncio.create_task(
                    self._push(record, self.assignments(worker_id), key), name=f"push-{worker_id}"
                )
                self._pushes[worker_id] = task
                task.add_done_callback(functools.partial(self._push_ended, worker_id))

    def _push_ended(self, worker_id: str, _: asyncio.Task[None]) -> None:
        self._pushes.pop(worker_id, None)

    async def wait_pushes(self) -> None:
        """Until the pushes under way have ended (tests, shutdown)."""
        await asyncio.gather(*self._pushes.values(), return_exceptions=True)

    async def _push(self, record: WorkerRecord, assignments: list[Assignment], key: PushedKey) -> None:
        assert self._client is not None
        try:
            resp = await self._client.put(
                f"{record.url}/engines",
                headers=self._worker_headers,
                json=[a.model_dump(mode="json") for a in assignments],
            )
            resp.raise_for_status()
            if record.state is not WorkerState.DEAD:  # declared dead meanwhile (a probe): nothing to remember
                self._pushed[record.worker_id] = key
        except httpx.HTTPError as exc:
            # The next heartbeat reply carries the same assignments, so nothing is lost.
            log.warning("push to worker %s failed (%s); its next heartbeat will carry it", record.worker_id, exc)

    # ------------------------------------------------------------------ probes

    def probe(self, worker_id: str) -> None:
        """A router could not connect to the worker: probe it in the background (each worker on its own, outside
        the reconcile lock; reports about a worker already being probed join that probe)."""
        if worker_id in self._probes:
            return
        task = asyncio.create_task(self._probe_worker(worker_id))
        self._probes[worker_id] = task
        task.add_done_callback(lambda _: self._probes.pop(worker_id, None))

    async def wait_probes(self) -> None:
        """Wait for the probes under way (tests and tools)."""
        await asyncio.gather(*self._probes.values())

    async def _probe_worker(self, worker_id: str) -> None:
        """A router could not connect: check at once instead of waiting for heartbeats to time out.

        Dead only after `probe_attempts` refused connections in a row, `probe_interval_s` apart: a worker process
        restarting, or a port refused for a moment, is not worth a failover. Any answer (whatever its status), a
        slow one, a heartbeat or a new registration meanwhile ends the probe with the worker left as it is.
        """
        record = self._workers.get(worker_id)
        if record is None or record.state is WorkerState.DEAD or self._client is None:
            return
        beats = record.beats
        attempts = self._settings.probe_attempts
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._settings.probe_interval_s)
                if not self._still_suspect(record, beats):
                    return
            try:
                await self._client.get(f"{record.url}/health", timeout=PROBE_TIMEOUT_S, headers=self._worker_headers)
                return  # it answered: alive
            except httpx.ConnectError:
                log.info("worker %s refused probe %d of %d", worker_id, attempt + 1, attempts)
            except httpx.HTTPError:
                return  # slow, not gone: heartbeats decide
        if self._still_suspect(record, beats):
            log.warning("worker %s refused %d probes in a row: declared dead", worker_id, attempts)
            self._on_refused(record)

    def _still_suspect(self, record: WorkerRecord, beats: int) -> bool:
        """No heartbeat, no new registration and not declared dead since the probe began."""
        return (
            self._workers.get(record.worker_id) is record
            and record.state is not WorkerState.DEAD
            and record.beats == beats
        )
