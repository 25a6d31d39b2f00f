"""Worker registry and the heartbeat state machine: healthy -> unhealthy -> dead -> forgotten (draining -> gone)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schemas import EngineStatus, GPUInfo, Heartbeat, HostMemory, WorkerInfo, WorkerRegistration, WorkerState


@dataclass
class WorkerRecord:
    registration: WorkerRegistration
    last_heartbeat: float
    state: WorkerState = WorkerState.HEALTHY
    gpus: list[GPUInfo] = field(default_factory=list)
    engines: dict[str, EngineStatus] = field(default_factory=dict)
    beats: int = 0  # heartbeats received since registration: a probe under way sees the worker is alive
    dead_since: float | None = None  # when it was declared dead (it is forgotten a retention period later)
    host_memory: HostMemory | None = None  # as its last registration or heartbeat measured it
    # Each GPU's memory by index, as registered (a GPU's size does not change; heartbeats replace `gpus` each beat).
    gpu_total_mb: dict[int, int] = field(default_factory=dict)
    # Each GPU's memory in use outside our engines (gpu_memory.py: what placement leaves out; current once `fresh`),
    # the last such estimate made while no engine of ours there was loading, waking, stopping or asleep, and the
    # last reading in which none on the worker was (estimated only when read).
    gpu_foreign_mb: dict[int, int] = field(default_factory=dict)
    gpu_foreign_fresh: bool = False
    gpu_foreign_settled_mb: dict[int, int] = field(default_factory=dict)
    gpu_foreign_reading: tuple[list[GPUInfo], dict[str, EngineStatus]] | None = None

    @property
    def worker_id(self) -> str:
        return self.registration.worker_id

    @property
    def url(self) -> str:
        return self.registration.url

    def info(self, now: float, foreign_memory_mb: dict[int, int]) -> WorkerInfo:
        """`foreign_memory_mb`: its GPUs' memory in use outside our engines (gpu_memory.current_of)."""
        reg = self.registration
        return WorkerInfo(
            worker_id=reg.worker_id,
            url=reg.url,
            state=self.state,
            gpus=self.gpus,
            cpu_slots=reg.cpu_slots,
            sleep_supported=reg.sleep_supported,
            heartbeat_age_s=round(max(0.0, now - self.last_heartbeat), 3),
            engines=list(self.engines.values()),
            host_memory=self.host_memory,
            foreign_memory_mb=foreign_memory_mb,  # validated into a dict of its own
        )


class WorkerRegistry:
    """Tracks workers by heartbeat age.

    No heartbeat for `timeout` seconds: unhealthy (no new requests or placements). For twice that: dead
    (its replicas are placed elsewhere). A worker whose heartbeat says it is leaving (its own shutdown) is draining:
    no new requests or placements, forgotten once it runs nothing (manager/draining.py). A dead worker stays listed
    for a retention period, then is forgotten (`expire_dead`). A heartbeat from a dead or unknown worker is refused
    so that the worker registers again and reports what it actually runs.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._workers: dict[str, WorkerRecord] = {}

    def register(self, reg: WorkerRegistration, now: float) -> WorkerRecord:
        record = WorkerRecord(
            registration=reg,
            last_heartbeat=now,
            gpus=list(reg.gpus),
            engines={e.replica_id: e for e in reg.engines},
            host_memory=reg.host_memory,
            gpu_total_mb={g.index: g.memory_total_mb for g in reg.gpus if g.memory_total_mb},
        )
        self._workers[reg.worker_id] = record
        return record

    def heartbeat(self, hb: Heartbeat, now: float) -> WorkerRecord | None:
        """Apply a heartbeat; None means 'unknown to me, register again'."""
        record = self._workers.get(hb.worker_id)
        if record is None or record.state is WorkerState.DEAD:
            return None
        record.last_heartbeat = now
        record.beats += 1
        record.state = WorkerState.DRAINING if hb.leaving else WorkerState.HEALTHY
        record.gpus = list(hb.gpus)
        record.engines = {e.replica_id: e for e in hb.engines}
        record.host_memory = hb.host_memory
        return record

    def sweep(self, now: float) -> list[tuple[WorkerRecord, WorkerState]]:
        """Advance states by heartbeat age; returns (worker, new state) for each change."""
        changes = []
        for record in self._workers.values():
            age = now - record.last_heartbeat
            new = record.state
            if age > 2 * self.timeout:
                new = WorkerState.DEAD
            elif age > self.timeout and record.state is WorkerState.HEALTHY:
                new = WorkerState.UNHEALTHY
            if new is not record.state:
                record.state = new
                if new is WorkerState.DEAD:
                    record.dead_since = now
                changes.append((record, new))
        return changes

    def excuse(self, seconds: float, now: float) -> None:
        """Do not count `seconds` of silence against anyone: the manager itself was not running then."""
        for record in self._workers.values():
            record.last_heartbeat = min(now, record.last_heartbeat + seconds)

    def mark_dead(self, worker_id: str, now: float) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is not None and record.state is not WorkerState.DEAD:
            record.state = WorkerState.DEAD
            record.dead_since = now
            return record
        return None

    def expire_dead(self, now: float, retention: float) -> list[WorkerRecord]:
        """Forget the workers dead for `retention` seconds or more, and return them. O(workers), once a pass."""
        expired = [
            r
            for r in self._workers.values()
            if r.dead_since is not None and r.state is WorkerState.DEAD and now - r.dead_since >= retention
        ]
        for record in expired:
            del self._workers[record.worker_id]
        return expired

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def healthy(self) -> list[WorkerRecord]:
        return [w for w in self._workers.values() if w.state is WorkerState.HEALTHY]
