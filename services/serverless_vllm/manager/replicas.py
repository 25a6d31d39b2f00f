"""The desired replicas: what the manager wants running where (`Replica`), indexed by id, model and worker.

Desired vs actual: these are the manager's decisions; what actually runs comes from the workers' heartbeats
(reports.py folds it into `Replica.state`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..schemas import ReplicaState

# The states of a replica that is (or is about to be) running: its model is loading until one is ready.
ACTIVE = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY, ReplicaState.WAKING)


@dataclass
class Replica:
    replica_id: str
    alias: str
    worker_id: str
    gpus: list[int]
    fraction: float
    state: ReplicaState = ReplicaState.PENDING
    asleep: bool = False  # desired: put to vLLM sleep (warm tier) rather than stopped
    asleep_since: float = 0.0
    sleep_level: int = 1  # asleep: vLLM's level, chosen as it is put to sleep (sleep_level.py) and kept until woken
    error: str | None = None
    cold_start_at: float | None = None  # placed as a cold start: its duration is observed at the first READY
    # When its current start began (placed, woken, started again): the log's phases say the time since then.
    start_at: float | None = None
    # When it is expected ready (unix seconds), from its model's past starts or wakes: set as it is placed or woken,
    # published with its model's route, cleared once it is ready.
    ready_at: float | None = None
    # Draining (manager/draining.py): out of routing and of its worker's assignments, finishing its requests in flight;
    # its GPUs stay claimed until its worker reports the engine gone.
    draining_since: float | None = None

    @property
    def label(self) -> str:
        """How the log names it, e.g. "model 'tiny' replica tiny-1a2b3c4d on worker w1"."""
        return f"model {self.alias!r} replica {self.replica_id} on worker {self.worker_id}"


class ReplicaIndex:
    """The desired replicas by id, also indexed by model alias and by worker.

    A replica's alias and worker never change, so the indexes only move on add and remove. They turn the
    per-model and per-worker questions (routing table, heartbeat replies, scaling, placement) from scans of
    every replica (O(models x replicas) for a table rebuild) into lookups. Iteration order is insertion order,
    in the whole and in each group, as with the plain dict this replaces.
    """

    def __init__(self) -> None:
        self._all: dict[str, Replica] = {}
        self._by_alias: dict[str, dict[str, Replica]] = {}
        self._by_worker: dict[str, dict[str, Replica]] = {}

    def add(self, replica: Replica) -> None:
        if replica.replica_id in self._all:
            self.remove(replica.replica_id)  # replaced: keep the groups consistent
        self._all[replica.replica_id] = replica
        self._by_alias.setdefault(replica.alias, {})[replica.replica_id] = replica
        self._by_worker.setdefault(replica.worker_id, {})[replica.replica_id] = replica

    def remove(self, replica_id: str) -> Replica:
        replica = self._all.pop(replica_id)
        for index, key in ((self._by_alias, replica.alias), (self._by_worker, replica.worker_id)):
            group = index[key]
            del group[replica_id]
            if not group:
                del index[key]
        return replica

    def get(self, replica_id: str) -> Replica | None:
        return self._all.get(replica_id)

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._all

    def __len__(self) -> int:
        return len(self._all)

    def values(self) -> Iterable[Replica]:
        return self._all.values()

    def of_alias(self, alias: str) -> list[Replica]:
        group = self._by_alias.get(alias)
        return list(group.values()) if group else []

    def of_worker(self, worker_id: str) -> list[Replica]:
        group = self._by_worker.get(worker_id)
        return list(group.values()) if group else []

    def has_alias(self, alias: str) -> bool:
        return alias in self._by_alias

    @property
    def alias_groups(self) -> Mapping[str, Mapping[str, Replica]]:
        """The index by model: alias -> replica id -> replica (live, read-only; for checks and tools)."""
        return self._by_alias

    @property
    def worker_groups(self) -> Mapping[str, Mapping[str, Replica]]:
        """The index by worker: worker id -> replica id -> replica (live, read-only; for checks and tools)."""
        return self._by_worker
