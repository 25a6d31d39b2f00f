"""Which vLLM sleep level an idle replica on a GPU worker goes to (a pure function of what its worker reports).

Level 1 offloads the engine's weights to the worker's host memory and wakes in a second or less (a copy back);
level 2 discards them and wakes by reading them from disk again (seconds to minutes for a large model), but costs
no host memory. Level 1 whenever it fits, so:

    weights of the replicas asleep at level 1 on that worker (those decided and not yet asleep too) + this one's
        <= fraction x (available host memory + the weights already offloaded there)

Available memory, as the worker measures it, already lacks the weights the engines asleep at level 1 hold, so they
are added back: the budget is a fraction of the memory there would be with none offloaded, and stays the same as
replicas fall asleep. The fraction (SLEEP_HOST_MEMORY_FRACTION) leaves the rest to the engines' processes and the
page cache; the worker measures it again every heartbeat.

A replica whose weights' size the worker cannot tell (not on its disk in a layout it knows) counts as the GPU
memory it may use (its GPUs' memory x its gpu_memory_utilization), which its weights cannot exceed: it sleeps at
level 1 only if even that fits. A worker that reports no host memory (an older worker) gets level 1, vLLM's
default and what every sleep was before levels were chosen.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..schemas import ReplicaState
from .replicas import Replica
from .workers import WorkerRecord

_MIB = 1024 * 1024


def weights_bound(replica: Replica, record: WorkerRecord) -> int:
    """The replica's weights as its worker reports them, else the most they can be (the GPU memory it may use)."""
    status = record.engines.get(replica.replica_id)
    if status is not None and status.weights_bytes is not None:
        return status.weights_bytes
    memory = sum(g.memory_total_mb for g in record.gpus if g.index in replica.gpus) * _MIB
    return int(memory * replica.fraction)


def _offloaded(replica: Replica, record: WorkerRecord) -> bool:
    """Its worker says it sleeps at level 1: its weights are in host memory already (out of `available`)."""
    status = record.engines.get(replica.replica_id)
    return status is not None and status.state is ReplicaState.SLEEPING and status.sleep_level == 1


def choose_sleep_level(replica: Replica, record: WorkerRecord, on_worker: Iterable[Replica], fraction: float) -> int:
    """The sleep level for `replica`, about to be put to sleep on `record`'s worker (`on_worker`: every replica
    there, `replica` among them or not)."""
    memory = record.host_memory
    if memory is None:
        return 1
    at_level_1 = [r for r in on_worker if r.asleep and r.sleep_level == 1 and r.replica_id != replica.replica_id]
    needed = weights_bound(replica, record) + sum(weights_bound(r, record) for r in at_level_1)
    held = sum(weights_bound(r, record) for r in at_level_1 if _offloaded(r, record))
    return 1 if needed <= fraction * (memory.available_bytes + held) else 2
