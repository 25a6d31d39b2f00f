"""Placement: which worker and which GPUs serve a replica. Pure functions over a snapshot of the fleet.

Memory-aware: a replica asking for gpu_memory_utilization u with tensor_parallel_size t needs t GPUs of one
worker, each with at least u of its memory not yet claimed by other replicas; several replicas share a GPU
when their fractions fit. CPU-only workers (no GPU) run a bounded number of engines and are used only
when no GPU worker fits.

On a shared GPU the fractions are not all: vLLM checks at start that the memory then free, after its own CUDA
context and with the other engines' contexts in use, is at least u of the GPU (its budget does not hold what was in
use before it measured). So a GPU with engines on it keeps, for each engine and the newcomer, `engine_overhead_mb`
of its memory outside the claims (GPU_ENGINE_OVERHEAD_MB); a GPU alone takes any u, as vLLM would started by hand.
Memory that other processes use (another job, an engine a crashed worker left behind) is not free either: it is
measured from the worker's heartbeats (gpu_memory.py) and left out as well.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..schemas import EngineArgs, PlacementRejection

# Claims are floats; tolerate rounding so that e.g. 0.3 + 0.3 + 0.4 fits one GPU.
_EPS = 1e-6


@dataclass
class WorkerCapacity:
    """What placement needs to know about one worker."""

    worker_id: str
    healthy: bool
    gpu_indices: list[int]
    gpu_claims: dict[int, float] = field(default_factory=dict)  # GPU index -> claimed fraction
    gpu_engines: dict[int, int] = field(default_factory=dict)  # GPU index -> engines claiming some of it
    # An engine's memory outside its claim (GPU_ENGINE_OVERHEAD_MB), and each GPU's memory as the worker registered it
    # (its record's own mapping, shared: a snapshot of 3,000 workers copies nothing per GPU).
    engine_overhead_mb: float = 0.0
    gpu_total_mb: Mapping[int, int] = field(default_factory=dict)
    # Each GPU's memory in use outside this fleet's engines, from the worker's last heartbeat (gpu_memory.py).
    gpu_foreign_mb: Mapping[int, int] = field(default_factory=dict)
    cpu_slots: int = 0
    cpu_used: int = 0
    aliases: set[str] = field(default_factory=set)  # models with a replica here already

    def free_fraction(self, gpu: int) -> float:
        """What a new engine may still ask for on `gpu`: the unclaimed memory, less the memory others use there,
        and, on a GPU with engines on it, each engine's memory outside its claim (theirs and the newcomer's: the
        module's docstring)."""
        free = 1.0 - self.gpu_claims.get(gpu, 0.0)
        total = self.gpu_total_mb.get(gpu)
        if not total:
            return free
        engines = self.gpu_engines.get(gpu, 0)
        outside = self.gpu_foreign_mb.get(gpu, 0) + ((engines + 1) * self.engine_overhead_mb if engines else 0.0)
        return free - outside / total


@dataclass(frozen=True)
class Placement:
    worker_id: str
    gpus: list[int]  # empty: CPU engine
    fraction: float  # claimed on each GPU


_REASONS_SHOWN = 10


class PlacementError(Exception):
    def __init__(self, alias: str, rejections: list[PlacementRejection]) -> None:
        self.rejections = rejections
        # The first few reasons: the message goes into the model's error, every router's table and the log.
        shown = "; ".join(f"{r.worker_id}: {r.reason}" for r in rejections[:_REASONS_SHOWN])
        more = len(rejections) - _REASONS_SHOWN
        reasons = (f"{shown}; and {more} other worker(s)" if more > 0 else shown) or "no workers registered"
        super().__init__(f"cannot place {alias!r}: {reasons}")


def _fit_gpus(worker: WorkerCapacity, need: int, fraction: float) -> list[int] | None:
    """Best fit: the `need` GPUs with the least free memory that still fits, to keep big holes for big models."""
    fitting = [g for g in worker.gpu_indices if worker.free_fraction(g) + _EPS >= fraction]
    if len(fitting) < need:
        return None
    fitting.sort(key=lambda g: (worker.free_fraction(g), g))
    return sorted(fitting[:need])


def _gpu_rejection(worker: WorkerCapacity, need: int, fraction: float) -> str:
    if len(worker.gpu_indices) < need:
        return f"has {len(worker.gpu_indices)} GPU(s), model needs tensor_parallel_size={need}"
    free = ", ".join(f"gpu{g}: {worker.free_fraction(g):.2f}{_foreign(worker, g)}" for g in worker.gpu_indices)
    shared = worker.engine_overhead_mb and any(worker.gpu_engines.get(g) for g in worker.gpu_indices)
    overhead = " (less each engine's memory outside its claim, GPU_ENGINE_OVERHEAD_MB)" if shared else ""
    return f"needs {need} GPU(s) with {fraction:.2f} unclaimed memory each; unclaimed{overhead}: {free}"


def _foreign(worker: WorkerCapacity, gpu: int) -> str:
    mb = worker.gpu_foreign_mb.get(gpu, 0)
    return f" ({mb} MiB in use outside our engines)" if mb else ""


def place(alias: str, engine: EngineArgs, workers: list[WorkerCapacity]) -> Placement:
    """Choose where one new replica of `alias` goes, or raise PlacementError explaining every rejection.

    Preference: GPU workers over CPU workers; workers not yet serving this model (so replicas survive a
    worker's loss); then the least busy worker.
    """
    need, fraction = engine.tensor_parallel_size, engine.gpu_memory_utilization
    # Fast path: the winner is the first worker with the smallest (kind, repeat, load) among those that fit.
    # A worker's rank is cheap and the GPU fit is not, so the fit is tried only for a worker that would rank
    # strictly first so far (ties go to the earlier one). O(workers) either way,
    # but most workers cost a few comparisons; the rejections are only written out when nothing fits.
    best: tuple[tuple[int, int, float], Placement] | None = None
    for w in workers:
        if not w.healthy:
            continue
        repeat = int(alias in w.aliases)
        if w.gpu_indices:
            rank = (0, repeat, sum(w.gpu_claims.values()) / len(w.gpu_indices))
            if best is not None and rank >= best[0]:
                continue
            gpus = _fit_gpus(w, need, fraction)
            if gpus is not None:
                best = (rank, Placement(w.worker_id, gpus, fraction))
        elif need <= 1 and w.cpu_used < w.cpu_slots:
            rank = (1, repeat, w.cpu_used / max(1, w.cpu_slots))
            if best is None or rank < best[0]:
                best = (rank, Placement(w.worker_id, [], 0.0))
    if best is not None:
        return best[1]
    raise PlacementError(
        alias, [PlacementRejection(worker_id=w.worker_id, reason=_rejection(w, need, fraction)) for w in workers]
    )


def _rejection(w: WorkerCapacity, need: int, fraction: float) -> str:
    """Why `w` cannot take the replica (only asked once no worker could)."""
    if not w.healthy:
        return "not healthy"
    if w.gpu_indices:
        return _gpu_rejection(w, need, fraction)
    if need > 1:
        return f"CPU-only worker cannot run tensor_parallel_size={need}"
    return f"CPU-only worker full ({w.cpu_used}/{w.cpu_slots} engines)"


def claim(workers: list[WorkerCapacity], placement: Placement, alias: str) -> None:
    """Record a placement in the snapshot so that later decisions in the same pass see it."""
    for w in workers:
        if w.worker_id == placement.worker_id:
            if placement.gpus:
                for g in placement.gpus:
                    w.gpu_claims[g] = w.gpu_claims.get(g, 0.0) + placement.fraction
                    w.gpu_engines[g] = w.gpu_engines.get(g, 0) + 1
            else:
                w.cpu_used += 1
            w.aliases.add(alias)
            return


def release(workers: list[WorkerCapacity], worker_id: str, gpus: list[int], fraction: float) -> None:
    """Undo a claim (used to ask 'would it fit if this replica were stopped?')."""
    for w in workers:
        if w.worker_id == worker_id:
            if gpus:
                for g in gpus:
                    w.gpu_claims[g] = max(0.0, w.gpu_claims.get(g, 0.0) - fraction)
                    w.gpu_engines[g] = max(0, w.gpu_engines.get(g, 0) - 1)
            else:
                w.cpu_used = max(0, w.cpu_used - 1)
            return


@dataclass(frozen=True)
class EvictionCandidate:
    replica_id: str
    worker_id: str
    gpus: list[int]
    fraction: float
    last_used: float  # LRU order


def plan_eviction(
    alias: str, engine: EngineArgs, workers: list[WorkerCapacity], candidates: list[EvictionCandidate]
) -> tuple[Placement, list[str]] | None:
    """Fewest least-recently-used idle replicas whose stopping lets `alias` fit; None if none suffice.

    `candidates` are idle replicas of other models above their min_replicas, as the caller decided.
    """
    if not candidates:
        return None  # nothing to evict: spare the copy of the whole fleet
    trial = copy.deepcopy(workers)
    evicted: list[str] = []
    for cand in sorted(candidates, key=lambda c: c.last_used):
        release(trial, cand.worker_id, cand.gpus, cand.fraction)
        evicted.append(cand.replica_id)
        try:
            placement = place(alias, engine, trial)
        except PlacementError:
            continue
        # Keep only the evictions on the chosen worker: the others did not help.
        useful = [c.replica_id for c in candidates if c.replica_id in evicted and c.worker_id == placement.worker_id]
        return placement, useful
    return None
