"""Draining (issue 19, point 2) in the manager: the replica to remove is the least busy one, it leaves routing at
once and its worker's assignments with it, keeps its GPUs claimed until its worker reports the engine gone, and a
worker that says it is leaving is drained, replaced elsewhere, then forgotten. The worker's side: tests/unit/
test_worker_drain.py; with real processes: tests/test_draining.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.manager.draining import removal_order
from serverless_vllm.manager.replicas import Replica
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import (
    DemandReport,
    Endpoint,
    EngineStatus,
    Heartbeat,
    ModelLoad,
    ModelPatch,
    ModelRoute,
    ModelSpec,
    ModelState,
    ReplicaState,
    RoutingTable,
    WorkerRegistration,
    WorkerState,
)

from .fleet import NOWHERE, Clock, core_settings, gpu, running_core


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def core(tmp_path: Path, clock: Clock) -> AsyncIterator[ManagerCore]:
    async with running_core(core_settings(tmp_path, 10), clock) as c:
        yield c


def ready(replica_id: str, alias: str, gpus: list[int] | None = None) -> EngineStatus:
    return EngineStatus(replica_id=replica_id, alias=alias, state=ReplicaState.READY, gpus=gpus or [])


async def assigned(core: ManagerCore, worker_id: str, engines: list[EngineStatus] | None = None) -> list[str]:
    """What the worker is told to run, as its heartbeat reply says (the engines it reports given)."""
    record = core.workers.get(worker_id)
    gpus = record.registration.gpus if record is not None else []  # a heartbeat says which GPUs the worker has
    reply = await core.heartbeat(Heartbeat(worker_id=worker_id, engines=engines or [], gpus=gpus))
    return [a.replica_id for a in reply.assignments]


def endpoints(core: ManagerCore, alias: str) -> list[str]:
    route = core.routing_table().models.get(alias)
    return [e.replica_id for e in route.endpoints] if route else []


async def two_ready_replicas(core: ManagerCore) -> dict[str, str]:
    """Model `a` with one ready replica on each of two CPU workers: worker id -> replica id."""
    for w in ("w1", "w2"):
        await core.register_worker(WorkerRegistration(worker_id=w, url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", min_replicas=2, max_replicas=2))
    await core.reconcile()
    ids = {w: (await assigned(core, w))[0] for w in ("w1", "w2")}
    for w, rid in ids.items():
        await assigned(core, w, [ready(rid, "a")])
    assert sorted(endpoints(core, "a")) == sorted(ids.values())
    return ids


# --------------------------------------------------------------------------- which replica goes


def replica(rid: str, state: ReplicaState = ReplicaState.READY) -> Replica:
    return Replica(replica_id=rid, alias="a", worker_id="w", gpus=[], fraction=0.0, state=state)


def test_removal_order_is_not_ready_first_then_least_busy() -> None:
    replicas = [replica("r1"), replica("r2"), replica("r3", ReplicaState.STARTING), replica("r4")]
    busy = {"r1": 5, "r2": 1}
    assert [r.replica_id for r in removal_order(replicas, busy)] == ["r3", "r4", "r2", "r1"]


async def test_scale_down_removes_the_idle_replica_not_the_busy_one(core: ManagerCore) -> None:
    ids = await two_ready_replicas(core)
    # The replica that sorts first by id is the busy one: before draining, it was the one removed.
    busy, idle = sorted(ids.values())
    await core.report_demand(DemandReport(router_id="r1", models={"a": ModelLoad(in_flight=3, replicas={busy: 3})}))
    await core.patch_model("a", ModelPatch(min_replicas=1, max_replicas=1))
    await core.reconcile()
    assert endpoints(core, "a") == [busy]  # the idle one left routing at once
    states = {r.replica_id: r.state for r in core.model_info("a").replicas}
    assert states == {busy: ReplicaState.READY, idle: ReplicaState.STOPPING}


async def test_a_draining_replica_leaves_routing_and_assignments_at_once_and_goes_when_its_engine_has(
    core: ManagerCore,
) -> None:
    ids = await two_ready_replicas(core)
    await core.report_demand(
        DemandReport(router_id="r1", models={"a": ModelLoad(in_flight=1, replicas={ids["w1"]: 1})})
    )
    await core.patch_model("a", ModelPatch(min_replicas=1, max_replicas=1))
    await core.reconcile()
    gone = ids["w2"]
    assert endpoints(core, "a") == [ids["w1"]]
    # Not assigned any more (its worker drains it), yet kept, and its place still taken, while the worker runs it.
    draining = EngineStatus(replica_id=gone, alias="a", state=ReplicaState.STOPPING)
    for report in (ready(gone, "a"), draining):
        assert await assigned(core, "w2", [report]) == []
        assert core.replicas.get(gone) is not None and core.replicas.get(gone).state is ReplicaState.STOPPING
        assert endpoints(core, "a") == [ids["w1"]]
        assert {c.worker_id: c.cpu_used for c in core.reconciler.capacities()}["w2"] == 1
    # The worker no longer reports it: stopped, its memory free.
    assert await assigned(core, "w2", []) == []
    assert core.replicas.get(gone) is None
    assert {c.worker_id: c.cpu_used for c in core.reconciler.capacities()}["w2"] == 0
    assert [r.replica_id for r in core.model_info("a").replicas] == [ids["w1"]]


async def test_deleted_model_drains_before_its_engines_stop(core: ManagerCore) -> None:
    ids = await two_ready_replicas(core)
    await core.delete_model("a")
    assert "a" not in core.routing_table().models
    for w, rid in ids.items():
        assert await assigned(core, w, [ready(rid, "a")]) == []  # its worker drains it
        assert core.replicas.get(rid) is not None  # until the worker says it is gone
    for w, rid in ids.items():
        await assigned(core, w, [])
        assert core.replicas.get(rid) is None


async def test_a_new_engine_waits_for_the_gpu_memory_of_a_draining_one(core: ManagerCore, clock: Clock) -> None:
    """One GPU: a model deleted while busy drains there; the next model placed there gets the GPU, not a placement
    failure, and its worker starts it once the old engine is gone (tests/unit/test_worker_drain.py)."""
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)]))
    await core.register_model(ModelSpec(alias="old", model_name="org/old", gpu_memory_utilization=0.9))
    await core.reconcile()
    (old,) = await assigned(core, "g1")
    await assigned(core, "g1", [ready(old, "old", [0])])
    await core.delete_model("old")
    await core.register_model(ModelSpec(alias="new", model_name="org/new", gpu_memory_utilization=0.9))
    await core.reconcile()
    claims = {c.worker_id: c.gpu_claims for c in core.reconciler.capacities()}["g1"]
    assert claims[0] == pytest.approx(1.8)  # both claim the GPU until the old one is gone
    draining = EngineStatus(replica_id=old, alias="old", state=ReplicaState.STOPPING, gpus=[0])
    (new,) = await assigned(core, "g1", [draining])
    assert new != old and core.model_info("new").state is not ModelState.FAILED
    assert await assigned(core, "g1", []) == [new]
    assert {c.worker_id: c.gpu_claims for c in core.reconciler.capacities()}["g1"][0] == pytest.approx(0.9)


async def test_an_evicted_model_does_not_take_its_room_back_at_the_next_pass(core: ManagerCore, clock: Clock) -> None:
    """Two idle models, one GPU: the one evicted gets a replica back on demand, not by evicting the other in turn at
    every pass (engines started and drained in a loop)."""
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)]))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", gpu_memory_utilization=0.6))
    await core.reconcile()
    (a,) = await assigned(core, "g1")
    await assigned(core, "g1", [ready(a, "a", [0])])
    await core.register_model(ModelSpec(alias="b", model_name="org/b", gpu_memory_utilization=0.6))
    await core.reconcile()
    (b,) = await assigned(core, "g1", [ready(a, "a", [0])])
    for _ in range(3):
        clock.now += 1
        await assigned(core, "g1", [ready(b, "b", [0])])
        await core.reconcile()
    assert [r.replica_id for r in core.model_info("b").replicas] == [b]
    assert core.model_info("a").replicas == [] and core.model_info("a").desired_replicas == 0
    assert core.stats.evictions == 1


async def test_a_draining_replica_on_one_gpu_does_not_hold_a_model_off_a_free_one(core: ManagerCore) -> None:
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0), gpu(1)]))
    await core.register_model(ModelSpec(alias="old", model_name="org/old", gpu_memory_utilization=0.9))
    await core.reconcile()
    (old,) = await assigned(core, "g1")
    await core.delete_model("old")
    await core.register_model(ModelSpec(alias="new", model_name="org/new", gpu_memory_utilization=0.9))
    await core.reconcile()
    assert [r.gpus for r in core.model_info("new").replicas] != [core.replicas.get(old).gpus]


# --------------------------------------------------------------------------- a worker leaving


async def test_a_leaving_worker_is_drained_replaced_then_forgotten(core: ManagerCore) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=2))
    await core.register_model(ModelSpec(alias="a", model_name="org/a"))
    await core.reconcile()
    (rid,) = await assigned(core, "w1")
    await assigned(core, "w1", [ready(rid, "a")])
    # A second model placed there too, its engine not started yet when the worker is told to stop.
    await core.register_model(ModelSpec(alias="p", model_name="org/p"))
    await core.reconcile()
    (pending,) = [r.replica_id for r in core.replicas.of_worker("w1") if r.alias == "p"]
    await core.register_worker(WorkerRegistration(worker_id="w2", url=NOWHERE, cpu_slots=2))
    stopping = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.STOPPING)
    reply = await core.heartbeat(Heartbeat(worker_id="w1", engines=[stopping], leaving=True))
    assert reply.assignments == [] and not reply.reregister
    assert endpoints(core, "a") == []
    assert {w.worker_id: w.state for w in core.list_workers()}["w1"] is WorkerState.DRAINING
    assert core.replicas.get(pending) is None  # nothing ran there: gone at once
    await core.reconcile()
    placed = {core.replicas.get(r).alias: r for r in await assigned(core, "w2")}  # elsewhere, while rid drains
    assert set(placed) == {"a", "p"} and rid not in placed.values()
    assert core.replicas.get(rid).state is ReplicaState.STOPPING
    # Its engines are gone: the worker left, with no dead record behind it.
    reply = await core.heartbeat(Heartbeat(worker_id="w1", leaving=True))
    assert not reply.reregister and core.replicas.get(rid) is None
    assert [w.worker_id for w in core.list_workers()] == ["w2"]


async def test_an_engine_its_worker_stops_on_its_own_leaves_routing(core: ManagerCore) -> None:
    """A worker's shutdown began before the manager heard it was leaving (or from an older worker): the engine it
    reports stopping is drained, not routed to."""
    ids = await two_ready_replicas(core)
    stopping = EngineStatus(replica_id=ids["w1"], alias="a", state=ReplicaState.STOPPING)
    await core.heartbeat(Heartbeat(worker_id="w1", engines=[stopping]))
    assert endpoints(core, "a") == [ids["w2"]]
    assert core.replicas.get(ids["w1"]).state is ReplicaState.STOPPING


async def test_a_stopping_engine_is_not_adopted_after_a_manager_restart(core: ManagerCore) -> None:
    await core.register_model(ModelSpec(alias="a", model_name="org/a", preload=False))
    stopping = EngineStatus(replica_id="a-1", alias="a", state=ReplicaState.STOPPING, model_name="org/a")
    reply = await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1, engines=[stopping]))
    assert reply.assignments == [] and core.replicas.get("a-1") is None


# --------------------------------------------------------------------------- the routers' reports


def test_the_router_reports_its_busy_replicas() -> None:
    table = RouteTable()
    endpoint = {rid: Endpoint(replica_id=rid, worker_id="w", url=NOWHERE) for rid in ("r1", "r2", "r3")}
    table.update(
        RoutingTable(
            version=1,
            epoch="e",
            models={"a": ModelRoute(state=ModelState.READY, endpoints=list(endpoint.values()))},
        )
    )
    for rid in ("r1", "r1", "r2"):
        table.started("a", endpoint[rid])
    table.finished("a", endpoint["r2"])
    load = table.demand("router").models["a"]
    assert load.in_flight == 2 and load.replicas == {"r1": 2}  # idle replicas are not named
    assert load.model_dump()["replicas"] == {"r1": 2}
    assert "replicas" not in ModelLoad(in_flight=1).model_dump()  # none busy: the report stays as small as before
    table.finished("a", endpoint["r1"])
    table.finished("a", endpoint["r1"])
    assert table.demand("router").models == {}


async def test_reports_of_several_routers_are_summed(core: ManagerCore, clock: Clock) -> None:
    await core.report_demand(DemandReport(router_id="r1", models={"a": ModelLoad(in_flight=2, replicas={"x": 2})}))
    await core.report_demand(
        DemandReport(router_id="r2", models={"a": ModelLoad(in_flight=3, replicas={"x": 1, "y": 2})})
    )
    assert core.demand.replica_loads(clock.now) == {"x": 3, "y": 2}
    clock.now += 60  # reports too old count no more
    assert core.demand.replica_loads(clock.now) == {}
