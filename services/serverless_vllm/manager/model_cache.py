"""The hub models' files in the workers' caches: which workers prefetch which model, what they report, and what a
download that cannot succeed does to its model.

- **Targets.** A hub model registered is prefetched by the first PREFETCH_WORKERS workers (at most its max_replicas)
  that placement would choose for its replicas, in placement's order (`place`, `claim`, `place` again); when fewer
  fit now, other healthy workers that could run it fill in. Targets are kept, not re-ranked as load moves; a dead
  target, or one missing at registration (fewer workers than that), is taken by the next worker to register; after a
  manager restart each worker's report of what it was asked for makes it a target again (so a registry of 10,000
  models is not fetched again). Local paths are not prefetched. A hub LoRA adapter is prefetched where its base's
  files go (its base's targets), or, for a base from a local path, where placement would put the base's replicas: an
  engine's first load of it then finds it cached, and a source at fault fails it at registration, not at its first
  request.
- **Orders.** A worker's heartbeat replies carry the (model, revision) of every model it is a target of
  (worker_link.py); the worker (worker/prefetch.py) downloads them one at a time and reports each in its heartbeats.
- **Failures.** A download whose source is at fault (no such repository or revision, access refused) fails every
  model with that name and revision, whichever worker says so: FAILED with the worker's sentence as `last_error`, its
  replicas that serve nothing stopped. One whose worker cannot hold or get the files (its disk, offline) fails the
  model when none of its targets can. Other errors (the network, the hub's own) are shown and fail nothing: the
  engines may still get the files themselves. While the failure stands (the worker tries again every few minutes)
  the model stays failed, unless it is serving.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from ..config import ManagerSettings
from ..schemas import CacheFault, CacheProgress, CacheState, CacheStatus, ModelSpec, ReplicaState, WorkerState
from ..security.models import is_hub_id
from .placement import PlacementError, WorkerCapacity, claim, place
from .registry import ModelRecord, ModelRegistry
from .replicas import ReplicaIndex
from .workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

Key = tuple[str, str | None]  # (model name, revision): what a worker downloads
_FATAL = (CacheFault.SOURCE, CacheFault.WORKER)
_UNDER_WAY = (CacheState.QUEUED, CacheState.FETCHING)


class CacheRow(NamedTuple):
    """One model's files on one worker, for the metrics."""

    alias: str
    worker_id: str
    state: str
    bytes: int
    total: int | None


def cache_key(spec: ModelSpec) -> Key | None:
    """What a worker downloads for this registration (a LoRA adapter's weights too: its model_name); None for a
    local path (nothing to download)."""
    return (spec.model_name, spec.revision) if is_hub_id(spec.model_name) else None


def _label(key: Key) -> str:
    return key[0] + (f"@{key[1]}" if key[1] else "")


class ModelCache:
    def __init__(
        self,
        settings: ManagerSettings,
        clock: Callable[[], float],
        registry: ModelRegistry,
        replicas: ReplicaIndex,
        workers: WorkerRegistry,
        *,
        capacities: Callable[[], list[WorkerCapacity]],
        remove_replica: Callable[[str], object],
        rebuild: Callable[[Iterable[str]], None],
        poke: Callable[[], None],
    ) -> None:
        self._limit = settings.prefetch_workers
        self._clock = clock
        self._models = registry.models
        self._failed_recently = registry.failed_recently
        self._replicas = replicas
        self._workers = workers
        self._capacities = capacities
        self._remove_replica = remove_replica
        self._rebuild = rebuild
        self._poke = poke
        self._targets: dict[str, list[str]] = {}  # alias -> the workers asked to prefetch it
        self._by_worker: dict[str, set[str]] = {}  # worker -> the aliases it prefetches
        self._orders: dict[str, tuple[Key, ...]] = {}  # worker -> its orders, until its targets change
        # Aliases with fewer targets than wanted (a dead worker's, none to be had at registration): the next worker to
        # join takes the place.
        self._short: set[str] = set()
        self._aliases: dict[Key, set[str]] = {}  # the aliases registered with each hub model and revision
        self._reports: dict[Key, dict[str, CacheStatus]] = {}  # what each worker last said of each model
        self._reported_by: dict[str, set[Key]] = {}
        for alias, record in registry.models.items():  # loaded from SQLite: targets come back with the workers
            self._index(alias, record.spec)

    # ------------------------------------------------------------------ targets

    def model_registered(self, alias: str) -> None:
        """A new registration: choose its targets (the workers then learn it from their next heartbeat reply)."""
        record = self._models[alias]
        key = self._index(alias, record.spec)
        if key is None or not self._limit:
            return
        for worker_id in self._choose(alias, record, self._want(record)):
            self._add(alias, worker_id)
        if self._room(alias, record):
            self._short.add(alias)  # the next worker to join takes the missing place
        if self._targets.get(alias):
            log.info("prefetching %s (model %r) to %s", _label(key), alias, ", ".join(self._targets[alias]))
        for worker_id, status in list(self._reports.get(key, {}).items()):
            self._judge(worker_id, key, status, None)  # a source already known bad fails it at once

    def forget(self, alias: str) -> None:
        """The model was deleted: no worker prefetches it any more (their caches keep what they have)."""
        for worker_id in self._targets.pop(alias, []):
            self._by_worker.get(worker_id, set()).discard(alias)
            self._orders.pop(worker_id, None)
        self._short.discard(alias)
        for key in [k for k, aliases in self._aliases.items() if alias in aliases]:
            self._aliases[key].discard(alias)
            if not self._aliases[key]:
                del self._aliases[key]

    def worker_joined(self, record: WorkerRecord) -> None:
        """A worker registered (its report already folded): it takes back the models it says it was asked for
        (a manager restart), and the place of targets lost with dead workers."""
        worker_id = record.worker_id
        for key in self._reported_by.get(worker_id, set()):
            for alias in self._aliases.get(key, set()):
                model = self._models.get(alias)
                if model is not None and self._room(alias, model) and worker_id not in self._targets.get(alias, []):
                    self._add(alias, worker_id)
        for alias in list(self._short):
            model = self._models.get(alias)
            if model is None or not self._room(alias, model):
                self._short.discard(alias)
            elif worker_id not in self._targets.get(alias, []) and _capable(record, self._basis(alias, model)[1]):
                self._add(alias, worker_id)
                log.info("prefetching model %r to %s, which joined", alias, worker_id)
                if not self._room(alias, model):
                    self._short.discard(alias)

    def prune(self) -> None:
        """Each reconcile pass: dead workers are no targets (their models wait for the next worker to join), and
        forgotten workers' reports go. O(workers)."""
        for worker_id in list(self._by_worker):
            record = self._workers.get(worker_id)
            if record is None or record.state is WorkerState.DEAD:
                for alias in self._by_worker.pop(worker_id):
                    self._targets[alias].remove(worker_id)
                    self._short.add(alias)
                self._orders.pop(worker_id, None)
        for worker_id in [w for w in self._reported_by if self._workers.get(w) is None]:
            self._fold_out(worker_id, self._reported_by.pop(worker_id))

    def orders(self, worker_id: str) -> tuple[Key, ...]:
        """The models this worker should have in its cache (its heartbeat replies carry them)."""
        orders = self._orders.get(worker_id)
        if orders is None:
            keys = {cache_key(self._models[a].spec) for a in self._by_worker.get(worker_id, ()) if a in self._models}
            orders = self._orders[worker_id] = tuple(sorted((k for k in keys if k is not None), key=str))
        return orders

    def _want(self, model: ModelRecord) -> int:
        return min(self._limit, model.spec.max_replicas)

    def _room(self, alias: str, model: ModelRecord) -> bool:
        return cache_key(model.spec) is not None and len(self._targets.get(alias, [])) < self._want(model)

    def _basis(self, alias: str, model: ModelRecord) -> tuple[str, ModelRecord]:
        """The model whose engines the files are for: an adapter's base (it is loaded into them), else itself."""
        base = model.spec.base
        if base is not None and base in self._models:
            return base, self._models[base]
        return alias, model

    def _choose(self, alias: str, model: ModelRecord, want: int) -> list[str]:
        """A new registration's targets: an adapter goes where its base's files go (its base's targets), or where
        placement would put its base's replicas (a base from a local path has no targets); a model, see _rank."""
        basis, record = self._basis(alias, model)
        if basis != alias and self._targets.get(basis):
            return self._targets[basis][:want]
        return self._rank(basis, record, want)

    def _rank(self, alias: str, model: ModelRecord, want: int) -> list[str]:
        """The first `want` workers placement would choose for the model's replicas, then other capable ones."""
        caps = copy.deepcopy(self._capacities())
        engine = model.engine()
        chosen: list[str] = []
        while len(chosen) < want:
            try:
                placement = place(alias, engine, caps)
            except PlacementError:
                break
            if placement.worker_id in chosen:  # the only worker left with room takes a second replica
                break
            chosen.append(placement.worker_id)
            claim(caps, placement, alias)
        for cap in sorted(caps, key=lambda c: not c.gpu_indices):  # GPU workers first, as placement prefers
            if len(chosen) >= want:
                break
            fits = (
                len(cap.gpu_indices) >= engine.tensor_parallel_size
                if cap.gpu_indices
                else engine.tensor_parallel_size == 1 and cap.cpu_slots > 0
            )
            if cap.healthy and fits and cap.worker_id not in chosen:
                chosen.append(cap.worker_id)
        return chosen

    def _add(self, alias: str, worker_id: str) -> None:
        self._targets.setdefault(alias, []).append(worker_id)
        self._by_worker.setdefault(worker_id, set()).add(alias)
        self._orders.pop(worker_id, None)

    def _index(self, alias: str, spec: ModelSpec) -> Key | None:
        key = cache_key(spec)
        if key is not None:
            self._aliases.setdefault(key, set()).add(alias)
        return key

    # ------------------------------------------------------------------ reports

    def fold(self, worker_id: str, statuses: list[CacheStatus]) -> None:
        """A worker's report (registration or heartbeat): O(its models)."""
        seen: set[Key] = set()
        for status in statuses:
            key = (status.model_name, status.revision)
            seen.add(key)
            reports = self._reports.setdefault(key, {})
            before = reports.get(worker_id)
            reports[worker_id] = status
            if status.state is CacheState.FAILED:
                self._judge(worker_id, key, status, before)
        self._fold_out(worker_id, self._reported_by.get(worker_id, set()) - seen)
        self._reported_by[worker_id] = seen

    def _fold_out(self, worker_id: str, keys: Iterable[Key]) -> None:
        for key in keys:
            reports = self._reports.get(key)
            if reports is not None:
                reports.pop(worker_id, None)
                if not reports:
                    del self._reports[key]

    def _judge(self, worker_id: str, key: Key, status: CacheStatus, before: CacheStatus | None) -> None:
        """A failed download: what it does to the models registered with that name and revision."""
        if status.state is not CacheState.FAILED:
            return
        news = before is None or before.state is not CacheState.FAILED or before.error != status.error
        message = f"worker {worker_id} cannot cache {_label(key)}: {status.error}"
        now = self._clock()
        for alias in list(self._aliases.get(key, ())):
            model = self._models.get(alias)
            if model is None:
                continue
            if news:
                model.last_error = message
                log.warning("model %s: %s", alias, message)
            if status.fault not in _FATAL or self._failed_recently(model, now):
                continue
            if status.fault is CacheFault.WORKER and any(self._may_cache(w, key) for w in self._targets.get(alias, [])):
                continue
            mine = self._replicas.of_alias(alias)
            if any(r.state is ReplicaState.READY or r.asleep for r in mine):
                continue  # it serves (from files it has): a failed prefetch takes nothing away
            model.last_error = message
            model.failed_at = now
            model.scale.target = 0
            for replica in mine:
                self._remove_replica(replica.replica_id)
            log.warning("model %s failed: %s", alias, message)
            self._rebuild([alias])
            self._poke()

    def _may_cache(self, worker_id: str, key: Key) -> bool:
        """Whether a target may still get the model's files (no fatal failure reported by a live worker)."""
        record = self._workers.get(worker_id)
        if record is None or record.state is WorkerState.DEAD:
            return False
        status = self._reports.get(key, {}).get(worker_id)
        return status is None or status.state is not CacheState.FAILED or status.fault not in _FATAL

    # ------------------------------------------------------------------ views

    def info(self, alias: str) -> dict[str, CacheProgress]:
        """GET /v1/models/{alias}'s `cache`: its files on each worker asked for them (queued until it reports)."""
        model = self._models.get(alias)
        key = cache_key(model.spec) if model is not None else None
        if key is None:
            return {}
        out: dict[str, CacheProgress] = {}
        for worker_id, s in self._reports.get(key, {}).items():
            record = self._workers.get(worker_id)
            if record is not None and record.state is not WorkerState.DEAD:
                out[worker_id] = CacheProgress(state=s.state, bytes=s.bytes, total=s.total, error=s.error)
        for worker_id in self._targets.get(alias, []):
            out.setdefault(worker_id, CacheProgress(state=CacheState.QUEUED))
        return out

    def fetching(self, alias: str, worker_id: str) -> bool:
        """Whether the worker is still downloading (or about to download) the model's files."""
        model = self._models.get(alias)
        key = cache_key(model.spec) if model is not None else None
        if key is None:
            return False
        status = self._reports.get(key, {}).get(worker_id)
        return status is not None and status.state in _UNDER_WAY

    def rows(self) -> Iterator[CacheRow]:
        """Every model's files on every live worker that reported them, for a scrape."""
        for key, reports in self._reports.items():
            for alias in self._aliases.get(key, ()):
                for worker_id, s in reports.items():
                    record = self._workers.get(worker_id)
                    if record is not None and record.state is not WorkerState.DEAD:
                        yield CacheRow(alias, worker_id, s.state.value, s.bytes, s.total)


def _capable(record: WorkerRecord, model: ModelRecord) -> bool:
    """Whether the worker could ever run the model (enough GPUs; a CPU worker for a one-GPU model)."""
    need = model.engine().tensor_parallel_size
    if record.gpus:
        return len(record.gpus) >= need
    return need == 1 and record.registration.cpu_slots > 0
