"""What a loading model is doing and when it should be ready: the manager learns each model's start (and wake)
durations from its past ones (a moving average, kept in the SQLite registry), shows the phase and the expected
time left in `GET /v1/models/{alias}`, and publishes the expected ready time in the model's route (the router's
`Retry-After` and keep-alive comments use it: tests/unit/test_hold_stream.py).

ManagerCore without transport, a settable clock for the durations; the expected ready time is wall-clock time
(routers compare it with their own clocks), so it is checked against time.time() with a margin."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from serverless_vllm.config import ManagerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import (
    DemandReport,
    EngineStatus,
    Heartbeat,
    ModelSpec,
    ReplicaState,
    WorkerRegistration,
)

from .fleet import NOWHERE, Clock, gpu, running_core


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings(tmp_path: Path) -> ManagerSettings:
    return ManagerSettings(db_path=str(tmp_path / "m.db"), heartbeat_timeout_s=600, model_dirs=["/"])


@pytest.fixture
async def core(tmp_path: Path, clock: Clock) -> AsyncIterator[ManagerCore]:
    async with running_core(settings(tmp_path), clock) as c:
        yield c


async def start(core: ManagerCore, clock: Clock, worker: str, seconds: float) -> str:
    """Ask for the model `a` (a router's wake), and let its replica take `seconds` (of the clock) to become ready."""
    await core.report_demand(DemandReport(router_id="r1", wake=["a"]))
    await core.reconcile()
    rid = (await core.heartbeat(Heartbeat(worker_id=worker))).assignments[0].replica_id
    clock.now += seconds
    ready = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY)
    await core.heartbeat(Heartbeat(worker_id=worker, engines=[ready]))
    return rid


async def idle_to_zero(core: ManagerCore, clock: Clock, worker: str, rid: str) -> None:
    ready = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY)
    for _ in range(7):  # idle past idle_timeout_s: back to zero replicas
        clock.now += 1
        await core.heartbeat(Heartbeat(worker_id=worker, engines=[ready]))
        await core.reconcile()
    assert (await core.heartbeat(Heartbeat(worker_id=worker))).assignments == []
    await core.heartbeat(Heartbeat(worker_id=worker))
    assert core.model_info("a").state == "cold"


async def test_expected_ready_time_after_one_start(core: ManagerCore, clock: Clock, tmp_path: Path) -> None:
    await core.register_worker(WorkerRegistration(worker_id="c1", url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", preload=False, idle_timeout_s=5))
    # The first start: nothing is known yet.
    await core.report_demand(DemandReport(router_id="r1", wake=["a"]))
    await core.reconcile()
    info = core.model_info("a")
    assert (info.state, info.phase, info.expected_ready_s) == ("loading", "starting", None)
    assert core.routing_table().models["a"].ready_at is None
    rid = (await core.heartbeat(Heartbeat(worker_id="c1"))).assignments[0].replica_id
    clock.now += 40
    await core.heartbeat(
        Heartbeat(worker_id="c1", engines=[EngineStatus(replica_id=rid, alias="a", state=ReplicaState.STARTING)])
    )
    clock.now += 4  # placed 44 s ago
    await core.heartbeat(
        Heartbeat(worker_id="c1", engines=[EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY)])
    )
    info = core.model_info("a")
    assert (info.state, info.phase, info.expected_ready_s) == ("ready", None, None)
    assert (info.start_times.start_s, info.start_times.starts) == (44.0, 1)

    # The next start is expected to take as long.
    await idle_to_zero(core, clock, "c1", rid)
    await core.report_demand(DemandReport(router_id="r1", wake=["a"]))
    before = time.time()
    await core.reconcile()
    info = core.model_info("a")
    assert (info.state, info.phase) == ("loading", "starting")
    assert info.expected_ready_s is not None and 42.5 <= info.expected_ready_s <= 44.0
    ready_at = core.routing_table().models["a"].ready_at
    assert ready_at is not None and before + 43.5 <= ready_at <= time.time() + 44.5

    # Kept with the registration: a restarted manager knows it.
    await core.close()
    again = ManagerCore(settings(tmp_path), clock=clock)
    assert again.model_info("a").start_times.start_s == 44.0
    await again.close()


async def test_the_average_follows_the_starts_and_goes_with_the_model(core: ManagerCore, clock: Clock) -> None:
    await core.register_worker(WorkerRegistration(worker_id="c1", url=NOWHERE, cpu_slots=1))
    spec = ModelSpec(alias="a", model_name="org/a", preload=False, idle_timeout_s=5)
    await core.register_model(spec)
    for seconds in (30, 60):
        rid = await start(core, clock, "c1", seconds)
        await idle_to_zero(core, clock, "c1", rid)
    times = core.model_info("a").start_times
    assert (times.start_s, times.starts) == (45.0, 2)  # the mean of the first ones
    for _ in range(6):
        rid = await start(core, clock, "c1", 100)
        await idle_to_zero(core, clock, "c1", rid)
    assert 85 < core.model_info("a").start_times.start_s < 100  # then it follows a change within a few starts
    # Deleted: what it learnt goes with it.
    await core.delete_model("a")
    await core.register_model(spec)
    assert core.model_info("a").start_times.starts == 0


async def test_a_wake_is_learnt_apart_from_a_start(core: ManagerCore, clock: Clock) -> None:
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)], sleep_supported=True))
    await core.register_model(
        ModelSpec(alias="a", model_name="org/a", preload=False, idle_timeout_s=5, gpu_memory_utilization=0.5)
    )
    rid = await start(core, clock, "g1", 90)
    ready = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY, gpus=[0])
    asleep = ready.model_copy(update={"state": ReplicaState.SLEEPING})
    waking = ready.model_copy(update={"state": ReplicaState.WAKING})
    for _ in range(2):  # two sleeps and wakes: the second wake is expected to take what the first took
        for _ in range(10):  # idle: put to sleep (not stopped)
            clock.now += 1
            await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
            await core.reconcile()
            if (await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))).assignments[0].asleep:
                break
        else:
            raise AssertionError("the idle replica was not put to sleep")
        await core.heartbeat(Heartbeat(worker_id="g1", engines=[asleep]))
        await core.report_demand(DemandReport(router_id="r1", wake=["a"]))
        await core.reconcile()
        info = core.model_info("a")
        assert (info.state, info.phase) == ("loading", "waking")
        wakes = info.start_times.wakes
        assert info.expected_ready_s is None if wakes == 0 else 2.5 <= info.expected_ready_s <= 3.0
        await core.heartbeat(Heartbeat(worker_id="g1", engines=[waking]))
        clock.now += 3
        await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
        assert core.model_info("a").state == "ready"
    times = core.model_info("a").start_times
    assert (times.start_s, times.starts, times.wake_s, times.wakes) == (90.0, 1, 3.0, 2)
