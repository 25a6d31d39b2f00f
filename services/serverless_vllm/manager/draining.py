"""Draining: how a replica leaves without cutting the requests it serves (scale-down, eviction, model delete, its
worker's own shutdown).

A replica to remove is *retired* rather than dropped: at once out of routing (the routers stop sending it requests)
and out of its worker's assignments, which makes the worker drain it: refuse new requests, let those in flight
finish (at most its DRAIN_TIMEOUT), then stop the engine (worker/drain.py). It stays in the desired replicas
meanwhile, shown as `stopping`, so its GPUs stay claimed (placement puts nothing else there, or an eviction's new
replica waits on the worker until the memory is free), and goes when its worker reports the engine gone. Which
replica goes is decided by the routers' load reports: the least busy (`removal_order`).

Pure rules over replicas; the reconciler, the engine reports and the core apply them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from ..schemas import ReplicaState
from .placement import EvictionCandidate
from .replicas import Replica

log = logging.getLogger(__name__)


def retire(replica: Replica, now: float, why: str) -> bool:
    """Take `replica` out of routing and of its worker's assignments; its worker drains it, then stops it. False if
    it was draining already."""
    if replica.draining_since is not None:
        return False
    replica.draining_since = now
    replica.state = ReplicaState.STOPPING
    replica.asleep, replica.ready_at, replica.cold_start_at = False, None, None
    log.info("%s: draining (%s)", replica.label, why)
    return True


def serving(replicas: Iterable[Replica]) -> list[Replica]:
    """The replicas that are not draining: the ones a model counts, routes to, scales, wakes."""
    return [r for r in replicas if r.draining_since is None]


def removal_order(replicas: Iterable[Replica], in_flight: Mapping[str, int]) -> list[Replica]:
    """The order in which to remove replicas: those not ready yet first (they serve nothing), then the least busy
    (requests in flight at the routers, by replica id), so a busy replica never goes while an idle one is left."""
    return sorted(replicas, key=lambda r: (r.state is ReplicaState.READY, in_flight.get(r.replica_id, 0), r.replica_id))


def freeing(replicas: Iterable[Replica]) -> list[EvictionCandidate]:
    """Draining replicas as eviction candidates: their memory is being freed anyway, so an eviction plan counts on
    them first (least recently used of all); the replica placed in their room starts once they are gone."""
    return [
        EvictionCandidate(r.replica_id, r.worker_id, r.gpus, r.fraction, float("-inf"))
        for r in replicas
        if r.draining_since is not None
    ]
