"""LoRA adapters registered as models: which replicas of its base hold each adapter, decided from demand, and what
the engines say they hold.

An adapter has no replica of its own. Its requests go to ready replicas of its base whose engine *reports* it
loaded (worker heartbeats carry each engine's own `/v1/models`): those are its route's endpoints. An adapter
asked for and held nowhere is given to the least busy ready base replica with room below `max_loras` (else the
least recently used adapter there is unloaded); the worker loads it through the engine's runtime adapter API and
its next heartbeat makes the route ready. Its demand counts toward its base (a base at zero replicas starts).
A load the engine refuses fails the adapter for `failed_retry_after_s` with the engine's reason. An adapter
registered with `preload` (the default) is given a free slot ahead of its first request, once (_preload).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..config import ManagerSettings
from ..metrics.adapters import adapter_text
from ..schemas import EngineArgs, ModelSpec, ReplicaState, WorkerState
from .autoscale import Demand
from .draining import retire, serving
from .registry import ModelRecord, ModelRegistry
from .replicas import ACTIVE, Replica, ReplicaIndex
from .routing_publisher import RoutingPublisher
from .workers import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

# An adapter with requests is unloaded for another only after this long on its replica (see _victim).
MIN_HOLD_S = 5.0


@dataclass
class AdapterStats:
    """Counters per adapter, for metrics (metrics/manager.py renders them)."""

    loads: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    unloads: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)


class AdapterManager:
    def __init__(
        self,
        settings: ManagerSettings,
        clock: Callable[[], float],
        registry: ModelRegistry,
        replicas: ReplicaIndex,
        workers: WorkerRegistry,
        demand: Demand,
        routing: RoutingPublisher,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._models = registry.models
        self._failed_recently = registry.failed_recently
        self._replicas = replicas
        self._workers = workers
        self._demand = demand
        self._routing = routing
        self.stats = AdapterStats()
        self._by_base: dict[str, set[str]] = {}  # base alias -> its adapters' aliases
        self._wanted: dict[str, dict[str, float]] = {}  # replica id -> adapter -> last used (clock)
        self._keys: dict[str, tuple[str, ...]] = {}  # replica id -> its wanted adapters, sorted (assignment key)
        self._loaded: dict[str, frozenset[str]] = {}  # replica id -> adapters its engine reports loaded
        self._asked: dict[tuple[str, str], float] = {}  # (replica id, adapter) -> when its load was asked for
        self._given: dict[tuple[str, str], float] = {}  # (replica id, adapter) -> when it was given that replica
        self._lora: set[str] = set()  # replicas whose engine was started with LoRA on
        self._active: dict[str, tuple[float, bool]] = {}  # adapter -> (load, wake) of the pass under way
        self._lora_args: dict[str, tuple[EngineArgs, EngineArgs]] = {}  # base -> (its args, with LoRA on)
        self._preloads: set[str] = set()  # registered with `preload`, waiting for a ready replica of their base
        for alias, model in self._models.items():
            self.registered(alias, model.spec)

    # ------------------------------------------------------------------ registry

    def registered(self, alias: str, spec: ModelSpec) -> None:
        if spec.base is not None:
            self._by_base.setdefault(spec.base, set()).add(alias)

    def deleted(self, alias: str, spec: ModelSpec) -> None:
        """An adapter deleted: unloaded everywhere (its name leaves every assignment)."""
        if spec.base is None:
            self._by_base.pop(alias, None)
            return
        self._by_base.get(spec.base, set()).discard(alias)
        self._preloads.discard(alias)
        for rid in list(self._wanted):
            self._drop(rid, alias)

    def preload(self, alias: str) -> bool:
        """An adapter registered with `preload`: put in a free adapter slot of a ready base replica at the next pass,
        or at the first pass that finds one of its base ready (its requests would wake the base: a preload does not).
        Tried once: it unloads no adapter and restarts no engine for it, so where every slot is taken its first
        request loads it. False when it is held already (a registration repeated)."""
        model = self._models.get(alias)
        if model is None or model.spec.base is None or not model.spec.preload or _held(self._wanted, alias):
            return False
        self._preloads.add(alias)
        return True

    def dependents(self, aliases: Iterable[str]) -> set[str]:
        """The adapters of these bases: their routes follow the base's replicas."""
        out: set[str] = set()
        for alias in aliases:
            out |= self._by_base.get(alias, set())
        return out

    # ------------------------------------------------------------------ what workers are told

    def engine(self, alias: str, model: ModelRecord) -> EngineArgs:
        """A base's engine arguments, with LoRA on when adapters are registered for it."""
        args = model.engine()
        if args.enable_lora or not self._by_base.get(alias):
            return args
        cached = self._lora_args.get(alias)
        if cached is None or cached[0] is not args:
            cached = (args, args.model_copy(update={"enable_lora": True}))
            self._lora_args[alias] = cached
        return cached[1]

    def key(self, replica_id: str) -> tuple[str, ...]:
        """The adapters a replica should hold, as part of its worker's assignment key."""
        return self._keys.get(replica_id, ())

    def assigned(self, replica_id: str) -> dict[str, str]:
        """name -> weights of the adapters a replica should hold (its assignment's `adapters`)."""
        out = {}
        for alias in self._keys.get(replica_id, ()):
            model = self._models.get(alias)
            if model is not None:
                out[alias] = model.spec.model_name
        return out

    # ------------------------------------------------------------------ demand and placement

    def fold_demand(self, loads: dict[str, float], wakes: set[str]) -> None:
        """Within a pass: an adapter's load counts toward its base, and an adapter asked to wake wakes its base."""
        self._active = {}
        for base, adapters in self._by_base.items():
            for alias in adapters:
                load, wake = loads.get(alias, 0.0), alias in wakes
                if load or wake:
                    self._active[alias] = (load, wake)
                    loads[base] = loads.get(base, 0.0) + load
                    if wake:
                        wakes.add(base)

    def demand_reported(self, aliases: Iterable[str], now: float) -> None:
        """Adapters with requests: their base is in use too (its idle timeout starts again)."""
        for alias in aliases:
            model = self._models.get(alias)
            base = self._models.get(model.spec.base) if model is not None and model.spec.base else None
            if base is not None:
                base.scale.last_active = now

    def place(self, now: float) -> None:
        """After a pass: adapters with demand held by enough ready base replicas, idle ones unloaded."""
        for rid in [rid for rid in self._wanted if rid not in self._replicas]:
            self._forget_replica(rid)
        changed: set[str] = set()
        busy = self._demand.replica_loads(now) if self._active else {}
        for base, adapters in self._by_base.items():
            if not adapters or base not in self._models:
                continue
            ready = self.ready(base)
            capable = [r for r in ready if r.replica_id in self._lora]
            for alias in sorted(adapters):
                changed |= self._place_one(alias, capable, busy, now)
            if capable and self._preloads & adapters:
                changed |= self._preload(sorted(self._preloads & adapters), capable, now)
            if (
                ready
                and not capable
                and any(a in self._active for a in adapters)
                and not _starting(self._replicas.of_alias(base))
            ):
                # Engines started before the base had adapters: one at a time is replaced by one with LoRA on.
                retire(ready[0], now, "restarted with LoRA on: its model has adapters")
                changed.add(base)
        if changed:
            self._routing.rebuild(changed)

    def _place_one(self, alias: str, ready: list[Replica], busy: dict[str, int], now: float) -> set[str]:
        model = self._models[alias]
        holders = [r for r in ready if alias in self._wanted.get(r.replica_id, {})]
        load, wake = self._active.get(alias, (0.0, False))
        if not load and not wake:
            idle = [r for r in holders if now - self._wanted[r.replica_id][alias] >= model.spec.idle_timeout_s]
            for r in idle:
                self._drop(r.replica_id, alias)
            return {alias} if idle else set()
        for r in holders:
            self._wanted[r.replica_id][alias] = now
        if self._failed_recently(model, now):
            return set()
        want = max(1, len(holders))
        if holders and load > model.spec.target_concurrency * len(holders):
            want += 1  # busy: spread to one more base replica (the base's autoscaler counts this load too)
        want = min(want, model.spec.max_replicas, len(ready))
        changed = set()
        while len(holders) < want:
            chosen = self._choose([r for r in ready if r not in holders], busy, now)
            if chosen is None:
                break
            holders.append(chosen)
            changed |= self._give(chosen, alias, now)
        return changed

    def _preload(self, aliases: list[str], ready: list[Replica], now: float) -> set[str]:
        """After the adapters with demand: each preload into the emptiest replica with a free slot, if there is one."""
        changed: set[str] = set()
        for alias in aliases:
            self._preloads.discard(alias)
            if _held(self._wanted, alias) or self._failed_recently(self._models[alias], now):
                continue
            chosen = self._choose(ready, {}, now, evict=False)  # no load counted: the emptiest with room
            if chosen is not None:
                changed |= self._give(chosen, alias, now)
            else:
                log.info(
                    "adapter %s not preloaded: every adapter slot of its base is taken (its first request loads it)",
                    alias,
                )
        return changed

    def _choose(
        self, candidates: list[Replica], busy: dict[str, int], now: float, evict: bool = True
    ) -> Replica | None:
        """The least busy replica with room; with none and `evict`, the least busy one with an adapter to unload (None:
        the adapter waits, for a replica to free up or the base to scale up with its demand)."""

        def order(r: Replica) -> tuple[int, int]:
            return busy.get(r.replica_id, 0), len(self._wanted.get(r.replica_id, {}))

        candidates = sorted(candidates, key=order)
        for r in candidates:
            if len(self._wanted.get(r.replica_id, {})) < self._max_loras(r):
                return r
        if not evict:
            return None
        return next((r for r in candidates if self._victim(r.replica_id, now) is not None), None)

    def _victim(self, rid: str, now: float) -> str | None:
        """The adapter to unload for another: least recently used, those without requests first; one with requests
        only once it has been held MIN_HOLD_S (two busy adapters on one slot take turns, not a load every pass)."""
        wanted = self._wanted.get(rid, {})
        evictable = [a for a in wanted if a not in self._active or now - self._given.get((rid, a), 0.0) >= MIN_HOLD_S]
        return min(evictable, key=lambda a: (a in self._active, wanted[a])) if evictable else None

    def _give(self, replica: Replica, alias: str, now: float) -> set[str]:
        rid = replica.replica_id
        wanted = self._wanted.setdefault(rid, {})
        changed = {alias}
        while len(wanted) >= self._max_loras(replica):
            victim = self._victim(rid, now)
            if victim is None:
                break
            log.info("%s: unloading adapter %s (LRU) to make room for %s", replica.label, victim, alias)
            self._drop(rid, victim)
            changed.add(victim)
        wanted[alias] = now
        self._keys[rid] = tuple(sorted(wanted))
        self._asked[(rid, alias)] = now
        self._given[(rid, alias)] = now
        log.info("%s: loading adapter %s", replica.label, alias)
        return changed

    def _drop(self, rid: str, alias: str) -> None:
        wanted = self._wanted.get(rid)
        if wanted is not None and wanted.pop(alias, None) is not None:
            self._keys[rid] = tuple(sorted(wanted))
            self._asked.pop((rid, alias), None)
            self._given.pop((rid, alias), None)

    def _forget_replica(self, rid: str) -> None:
        self._wanted.pop(rid, None)
        self._keys.pop(rid, None)
        self._loaded.pop(rid, None)
        self._lora.discard(rid)
        for key in [k for k in self._asked if k[0] == rid]:
            del self._asked[key]
        for key in [k for k in self._given if k[0] == rid]:
            del self._given[key]

    def _max_loras(self, replica: Replica) -> int:
        base = self._models.get(replica.alias)
        return base.engine().max_loras if base is not None else 1

    def ready(self, base: str) -> list[Replica]:
        """The base's replicas that can serve an adapter now: ready, awake, not draining, on a healthy worker."""
        out = []
        for r in serving(self._replicas.of_alias(base)):
            if r.state is ReplicaState.READY and not r.asleep:
                worker = self._workers.get(r.worker_id)
                if worker is not None and worker.state is WorkerState.HEALTHY:
                    out.append(r)
        return out

    # ------------------------------------------------------------------ what engines report

    def fold_reports(self, record: WorkerRecord) -> None:
        """A worker's engines' adapters (loaded, refused) folded in; the routes whose holders changed rebuilt."""
        now = self._clock()
        changed: set[str] = set()
        for status in record.engines.values():
            rid = status.replica_id
            if rid not in self._replicas:
                continue
            if status.lora:
                self._lora.add(rid)
            loaded = frozenset(status.adapters)
            if rid not in self._wanted:
                # First report of this replica here (a manager restart): what it holds is kept, not unloaded.
                base = self._by_base.get(status.alias, set())
                self._wanted[rid] = dict.fromkeys(sorted(loaded & base), now)
                self._keys[rid] = tuple(sorted(self._wanted[rid]))
            before = self._loaded.get(rid, frozenset())
            if loaded != before:
                self._loaded[rid] = loaded
                changed |= loaded ^ before
                for alias in loaded - before:
                    _count(self.stats.loads, alias)
                    asked = self._asked.pop((rid, alias), None)
                    if asked is not None:
                        seconds = self.stats.load_seconds
                        seconds[alias] = seconds.get(alias, 0.0) + now - asked
                for alias in before - loaded:
                    _count(self.stats.unloads, alias)
            for alias, reason in status.adapter_errors.items():
                if alias in self._wanted[rid]:
                    self._failed(rid, alias, reason, now)
                    changed.add(alias)
        if changed:
            self._routing.rebuild(a for a in changed if a in self._models)

    def _failed(self, rid: str, alias: str, reason: str, now: float) -> None:
        self._drop(rid, alias)
        _count(self.stats.failures, alias)
        model = self._models.get(alias)
        if model is not None:
            model.last_error = f"adapter '{alias}' could not be loaded by its base's engine: {reason}"
            model.failed_at = now
            log.error("replica %s refused adapter %s: %s", rid, alias, reason)

    def loaded(self, replica_id: str) -> frozenset[str]:
        """The adapters the replica's engine reports loaded."""
        return self._loaded.get(replica_id, frozenset())

    def wants(self, replica_id: str, alias: str) -> bool:
        """Whether the replica is asked to hold the adapter (loaded, or its load asked for)."""
        return alias in self._wanted.get(replica_id, {})

    def metrics_text(self) -> str:
        rows = []
        for rid, loaded in self._loaded.items():
            replica = self._replicas.get(rid)
            if replica is not None:
                rows.append((replica.alias, rid, len(loaded)))
        return adapter_text(self.stats, rows, (a for adapters in self._by_base.values() for a in adapters))


def _held(wanted: dict[str, dict[str, float]], alias: str) -> bool:
    """Whether any replica is asked to hold the adapter (`wanted`: replica id -> its adapters)."""
    return any(alias in adapters for adapters in wanted.values())


def _count(counter: dict[str, int], alias: str) -> None:
    counter[alias] = counter.get(alias, 0) + 1


def _starting(replicas: list[Replica]) -> bool:
    return any(r.state in ACTIVE and r.state is not ReplicaState.READY for r in serving(replicas))
