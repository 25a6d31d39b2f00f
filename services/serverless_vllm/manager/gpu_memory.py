"""GPU memory in use outside this fleet's engines, per GPU of a worker, from its registration and heartbeats.

Claims alone (placement.py) assume a GPU holds nothing but our engines. Another team's job, a notebook, or an
engine left behind by a crashed worker holds memory too, and vLLM refuses to start where the memory free at its
start is less than its gpu_memory_utilization of the GPU. NVML's used memory (every process) less what this
fleet's engines on the GPU may hold is that other use:

- an engine of ours (a replica of that id) in any state but failed: its claim of the GPU and its memory outside the
  claim (GPU_ENGINE_OVERHEAD_MB);
- an engine the manager does not know: nothing, so its memory counts as other use; a failed one: nothing (its
  process is gone).

An engine that is loading, waking or stopping holds less than that bound, and one asleep too (vLLM releases its
weights and cache and keeps its CUDA graphs and context, several GB on large models, a figure it does not report;
its claim stays reserved for its wake). So the estimate errs low on its GPUs, and there the last estimate made
without such an engine on the GPU stands when it is larger: what others used before it began loading or fell asleep
is still seen. Memory others take meanwhile is seen once it is serving again; while it sleeps, its wake may then
fail (the worker tries again at each heartbeat). A GPU without an engine of ours is measured exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..schemas import EngineStatus, GPUInfo, ReplicaState
from .replicas import ReplicaIndex
from .workers import WorkerRecord

# States in which an engine holds less than its claim, by an amount nobody reports.
_UNSETTLED = frozenset({ReplicaState.STARTING, ReplicaState.WAKING, ReplicaState.STOPPING, ReplicaState.SLEEPING})
_COUNTED = _UNSETTLED | {ReplicaState.READY}


def foreign_memory_mb(
    gpus: Iterable[GPUInfo], engines: Iterable[EngineStatus], fractions: Mapping[str, float], overhead_mb: float
) -> dict[int, int]:
    """GPU index -> MiB in use outside our engines, as one reading tells it (GPUs with none left out).
    `fractions`: the claim on each of its GPUs of every replica the manager placed on the worker, by id."""
    claimed: dict[int, float] = {}  # GPU index -> the claims of our engines on it
    engines_on: dict[int, int] = {}  # GPU index -> our engines on it
    for engine in engines:
        fraction = fractions.get(engine.replica_id)
        if fraction is None or engine.state not in _COUNTED:
            continue
        for index in engine.gpus:
            claimed[index] = claimed.get(index, 0.0) + fraction
            engines_on[index] = engines_on.get(index, 0) + 1
    foreign: dict[int, int] = {}
    for gpu in gpus:
        total = gpu.memory_total_mb
        other: float = total - gpu.memory_free_mb
        if gpu.index in engines_on:
            other -= claimed[gpu.index] * total + engines_on[gpu.index] * overhead_mb
        if other >= 1:
            foreign[gpu.index] = int(other)
    return foreign


def observe(record: WorkerRecord, replicas: ReplicaIndex, overhead_mb: float) -> None:
    """At each registration and heartbeat. Usually every engine of ours is settled (serving) and nothing is worked
    out: the reading is kept and estimated when something reads it (`current_of`, placement's capacity). While an
    engine of ours loads, wakes, stops or sleeps, the estimate is made at each heartbeat, with the figures of the last
    settled reading standing for that engine's GPUs where they are larger."""
    if not record.gpus:
        return  # a CPU worker
    unsettled: set[int] = set()
    for engine in record.engines.values():
        if engine.state in _UNSETTLED and engine.replica_id in replicas:
            unsettled.update(engine.gpus)
    if not unsettled:
        record.gpu_foreign_reading = (record.gpus, record.engines)
        record.gpu_foreign_fresh = False
        return
    settled = record.gpu_foreign_settled_mb
    if record.gpu_foreign_reading is not None:  # the first reading with an engine unsettled: the one before stands
        gpus, engines = record.gpu_foreign_reading
        settled.clear()
        settled.update(_estimate(record.worker_id, gpus, engines, replicas, overhead_mb))
        record.gpu_foreign_reading = None
    current = _estimate(record.worker_id, record.gpus, record.engines, replicas, overhead_mb)
    for gpu in record.gpus:
        if gpu.index not in unsettled:
            settled[gpu.index] = current.get(gpu.index, 0)
        elif settled.get(gpu.index, 0) > current.get(gpu.index, 0):
            current[gpu.index] = settled[gpu.index]
    record.gpu_foreign_mb, record.gpu_foreign_fresh = current, True


def current_of(record: WorkerRecord, replicas: ReplicaIndex, overhead_mb: float) -> dict[int, int]:
    """The worker's estimate by GPU index, worked out now where its last reading was only kept."""
    if not record.gpu_foreign_fresh:
        record.gpu_foreign_mb = _estimate(record.worker_id, record.gpus, record.engines, replicas, overhead_mb)
        record.gpu_foreign_fresh = True
    return record.gpu_foreign_mb


def _estimate(
    worker_id: str, gpus: list[GPUInfo], engines: Mapping[str, EngineStatus], replicas: ReplicaIndex, overhead_mb: float
) -> dict[int, int]:
    fractions = {r.replica_id: r.fraction for r in replicas.of_worker(worker_id)}
    return foreign_memory_mb(gpus, engines.values(), fractions, overhead_mb)
