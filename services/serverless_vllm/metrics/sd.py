"""Prometheus HTTP service discovery: the workers and the vLLM engines they run, as scrape targets.

Prometheus polls GET /sd/targets (engines) and GET /sd/workers and scrapes whatever is listed, so engines
and workers are picked up as they come and go without touching Prometheus' configuration. Engines listen
on the worker's loopback only, so an engine target is its worker's address with the path
/engines/{replica_id}/metrics, where the worker relays the engine's own /metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal
from urllib.parse import quote, urlsplit

from ..schemas import ReplicaState, WorkerInfo, WorkerState

SDKind = Literal["engines", "workers"]
TargetGroup = dict[str, list[str] | dict[str, str]]

# Engines that have an API server up to scrape. A starting engine has none yet: listing it would only add a
# failing target; a failed one is gone.
_SCRAPABLE = frozenset({ReplicaState.READY, ReplicaState.SLEEPING, ReplicaState.WAKING})


def _target(url: str, path: str, labels: dict[str, str]) -> TargetGroup:
    parts = urlsplit(url)
    prefix = parts.path.rstrip("/")  # a worker advertised behind a path prefix keeps it
    return {
        "targets": [parts.netloc],
        "labels": {"__scheme__": parts.scheme or "http", "__metrics_path__": f"{prefix}{path}", **labels},
    }


def worker_targets(workers: Iterable[WorkerInfo]) -> list[TargetGroup]:
    # Dead workers are left out: their absence is reported by the manager's svllm_worker_state.
    return [_target(w.url, "/metrics", {"worker": w.worker_id}) for w in workers if w.state is not WorkerState.DEAD]


def engine_targets(workers: Iterable[WorkerInfo]) -> list[TargetGroup]:
    """One group per engine that runs: what the workers report, not what the manager wishes."""
    groups = []
    for w in workers:
        if w.state is WorkerState.DEAD:
            continue
        for e in w.engines:
            if e.state in _SCRAPABLE:
                path = f"/engines/{quote(e.replica_id, safe='')}/metrics"
                groups.append(_target(w.url, path, {"worker": w.worker_id, "model": e.alias, "replica": e.replica_id}))
    return groups


def targets(workers: Iterable[WorkerInfo], kind: SDKind) -> list[TargetGroup]:
    return worker_targets(workers) if kind == "workers" else engine_targets(workers)
