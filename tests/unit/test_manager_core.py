"""ManagerCore without transport: registry persistence, worker re-registration, placement and adoption."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from serverless_vllm.config import ManagerSettings
from serverless_vllm.errors import APIError, validation_message
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import (
    DemandReport,
    EngineStatus,
    Heartbeat,
    ModelPatch,
    ModelSpec,
    ReplicaState,
    WorkerRegistration,
)

from .fleet import NOWHERE, Clock, core_settings, gpu, running_core


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def core(tmp_path: Path, clock: Clock) -> AsyncIterator[ManagerCore]:
    async with running_core(core_settings(tmp_path, 10), clock) as c:
        yield c


async def test_registration_persists_across_restart(tmp_path: Path) -> None:
    settings = ManagerSettings(db_path=str(tmp_path / "m.db"))
    first = ManagerCore(settings)
    await first.register_model(ModelSpec(alias="a", model_name="org/a", max_model_len=1024, preload=False))
    await first.close()
    second = ManagerCore(settings)
    info = second.model_info("a")
    assert info.model_name == "org/a" and info.engine.max_model_len == 1024 and info.state == "cold"
    assert second.epoch != first.epoch
    await second.close()


async def test_a_registration_repeated_with_preload_loads_the_model_again(tmp_path: Path) -> None:
    # `svllm up` run again: the registry kept its models, cold after the restart; it registers them again.
    settings = ManagerSettings(db_path=str(tmp_path / "m.db"))
    first = ManagerCore(settings)
    warm, lazy = ModelSpec(alias="a", model_name="org/a"), ModelSpec(alias="b", model_name="org/b", preload=False)
    for spec in (warm, lazy):
        await first.register_model(spec)
    assert (first.model_info("a").desired_replicas, first.model_info("b").desired_replicas) == (1, 0)
    await first.close()
    second = ManagerCore(settings)
    assert (second.model_info("a").desired_replicas, second.model_info("b").desired_replicas) == (0, 0)
    assert (await second.register_model(warm)).desired_replicas == 1
    assert (await second.register_model(lazy)).desired_replicas == 0
    await second.close()


async def test_duplicate_and_unknown(core: ManagerCore) -> None:
    spec = ModelSpec(alias="a", model_name="org/a", preload=False)
    await core.register_model(spec)
    await core.register_model(spec)  # idempotent
    with pytest.raises(APIError) as err:
        await core.register_model(spec.model_copy(update={"max_model_len": 64}))
    assert (err.value.status, err.value.code) == (409, "alias_exists")
    with pytest.raises(APIError) as err:
        core.model_info("missing")
    assert err.value.status == 404


async def test_unknown_worker_heartbeat_asks_to_register(core: ManagerCore) -> None:
    reply = await core.heartbeat(Heartbeat(worker_id="w1"))
    assert reply.reregister


async def test_preloaded_model_is_assigned_and_routed_when_ready(core: ManagerCore) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, gpus=[gpu(0), gpu(1)]))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", gpu_memory_utilization=0.5))
    await core.reconcile()
    reply = await core.heartbeat(Heartbeat(worker_id="w1"))
    assert len(reply.assignments) == 1
    assignment = reply.assignments[0]
    assert assignment.alias == "a" and len(assignment.gpus) == 1
    assert core.routing_table().models["a"].state == "loading"
    await core.heartbeat(
        Heartbeat(
            worker_id="w1",
            engines=[
                EngineStatus(
                    replica_id=assignment.replica_id, alias="a", state=ReplicaState.READY, gpus=assignment.gpus
                )
            ],
        )
    )
    route = core.routing_table().models["a"]
    assert route.state == "ready" and route.endpoints[0].url == NOWHERE


async def test_placement_failure_is_explained(core: ManagerCore, clock: Clock) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, gpus=[gpu(0)]))
    await core.register_model(ModelSpec(alias="big", model_name="org/big", tensor_parallel_size=4))
    await core.reconcile()
    # Just started: the workers that have not re-registered yet may have room, so the model is not failed yet.
    assert core.model_info("big").state != "failed"
    clock.now += core.settings.heartbeat_timeout_s
    await core.reconcile()
    info = core.model_info("big")
    assert info.state == "failed"
    assert "w1" in info.last_error and "tensor_parallel_size=4" in info.last_error


async def test_engines_sharing_a_gpu_keep_their_memory_outside_the_claims(core: ManagerCore, clock: Clock) -> None:
    """Two models of 0.5 on a worker with one GPU: vLLM would refuse to start the second (the memory free at its
    start is less than half the GPU, with the first engine's CUDA context and its own in use), so it is not placed
    there; GPU_ENGINE_OVERHEAD_MB=0 packs them by their fractions alone."""
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, gpus=[gpu(0)]))
    clock.now += core.settings.heartbeat_timeout_s  # not just started: an unplaceable model fails at once
    for alias in ("a", "b"):  # `a` kept (min_replicas 1): not evicted to make room for `b`
        spec = ModelSpec(alias=alias, model_name=f"org/{alias}", gpu_memory_utilization=0.5, min_replicas=1)
        await core.register_model(spec)
        await core.reconcile()
    assert [r.alias for r in core.replicas.values()] == ["a"]
    info = core.model_info("b")
    assert info.state == "failed" and "GPU_ENGINE_OVERHEAD_MB" in info.last_error and "gpu0: 0.47" in info.last_error


async def test_without_the_overhead_fractions_alone_decide(tmp_path: Path, clock: Clock) -> None:
    settings = core_settings(tmp_path, 10).model_copy(update={"gpu_engine_overhead_mb": 0})
    async with running_core(settings, clock) as core:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, gpus=[gpu(0)]))
        for alias in ("a", "b"):
            await core.register_model(ModelSpec(alias=alias, model_name=f"org/{alias}", gpu_memory_utilization=0.5))
            await core.reconcile()
        assert sorted(r.alias for r in core.replicas.values()) == ["a", "b"]


async def test_memory_others_use_keeps_replicas_off_a_gpu(core: ManagerCore, clock: Clock) -> None:
    """What the workers' NVML says is used beyond our engines is not placed on: another job's 60 GB on GPU 0 sends a
    replica of 0.5 to GPU 1 (by the claims alone it would go to GPU 0); beside an engine of ours serving with its
    claim, another job's 30 GB leaves no room for 0.4 more (without it, 0.47 would be free)."""
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, gpus=[gpu(0), gpu(1)]))
    await core.register_worker(
        WorkerRegistration(worker_id="g1", url="http://127.0.0.1:8", gpus=[gpu(0)], sleep_supported=True)
    )
    clock.now += core.settings.heartbeat_timeout_s  # not just started: an unplaceable model fails at once
    total = gpu(0).memory_total_mb
    busy = gpu(0).model_copy(update={"memory_free_mb": total - 60_000})
    await core.heartbeat(Heartbeat(worker_id="w1", gpus=[busy, gpu(1)]))
    await core.heartbeat(Heartbeat(worker_id="g1", gpus=[busy]))  # no room on g1 either
    listed = {w.worker_id: w.foreign_memory_mb for w in core.list_workers()}  # as GET /workers shows it
    assert listed == {"w1": {0: 60_000, 1: 559}, "g1": {0: 60_000}}  # 559: an idle GPU's driver share
    await core.register_model(ModelSpec(alias="a", model_name="org/a", gpu_memory_utilization=0.5))
    await core.reconcile()
    assert [(r.worker_id, r.gpus) for r in core.replicas.values()] == [("w1", [1])]

    # g1 freed, then `s` (kept: min_replicas 1) placed there and serving, with another job's 30 GB beside it.
    await core.heartbeat(Heartbeat(worker_id="g1", gpus=[gpu(0)]))
    spec = ModelSpec(alias="s", model_name="org/s", gpu_memory_utilization=0.5, min_replicas=1)
    await core.register_model(spec)
    await core.reconcile()
    (rid,) = [r.replica_id for r in core.replicas.values() if r.alias == "s" and r.worker_id == "g1"]
    serving = EngineStatus(replica_id=rid, alias="s", state=ReplicaState.READY, gpus=[0])
    taken = gpu(0).model_copy(update={"memory_free_mb": total - total // 2 - 900 - 30_000})
    await core.heartbeat(Heartbeat(worker_id="g1", gpus=[taken], engines=[serving]))
    await core.heartbeat(Heartbeat(worker_id="w1", gpus=[busy, busy]))  # nor on w1
    await core.register_model(ModelSpec(alias="b", model_name="org/b", gpu_memory_utilization=0.4))
    await core.reconcile()
    info = core.model_info("b")
    assert info.state == "failed" and info.last_error is not None and "g1: " in info.last_error
    # Used: 40,779 + 900 + 30,000 MiB; ours: 0.5 of 81,559 and its 1,024 outside the claim.
    assert "gpu0: 0.11 (29875 MiB in use outside our engines)" in info.last_error


async def test_memory_others_use_stays_seen_while_an_engine_loads_beside_it(core: ManagerCore, clock: Clock) -> None:
    """A loading engine holds only part of its claim, and one asleep too: the readings then say less of the memory is
    another's than the reading before did, and that earlier one stands. Evicting `s` (loading, then asleep, beside
    another job's 30 GB) would not make room for 0.65 of the GPU, so it is not evicted."""
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, gpus=[gpu(0)]))
    clock.now += core.settings.heartbeat_timeout_s
    total = gpu(0).memory_total_mb
    await core.heartbeat(Heartbeat(worker_id="w1", gpus=[gpu(0).model_copy(update={"memory_free_mb": total - 30_000})]))
    await core.register_model(ModelSpec(alias="s", model_name="org/s", gpu_memory_utilization=0.3))
    await core.reconcile()
    (rid,) = [r.replica_id for r in core.replicas.values()]
    loading = EngineStatus(replica_id=rid, alias="s", state=ReplicaState.STARTING, gpus=[0])
    partly = gpu(0).model_copy(update={"memory_free_mb": total - 30_000 - 2_000})  # 2 GB of its 24 loaded so far
    await core.heartbeat(Heartbeat(worker_id="w1", gpus=[partly], engines=[loading]))
    await core.register_model(ModelSpec(alias="b", model_name="org/b", gpu_memory_utilization=0.65))
    await core.reconcile()
    assert [r.replica_id for r in core.replicas.values()] == [rid]
    info = core.model_info("b")
    assert info.state == "failed" and info.last_error is not None
    assert "gpu0: 0.31 (30000 MiB in use outside our engines)" in info.last_error
    # Loaded (0.3 of the GPU and 900 MiB outside it), then asleep keeping 3 GB: the loaded reading stands.
    ready = loading.model_copy(update={"state": ReplicaState.READY})
    loaded = gpu(0).model_copy(update={"memory_free_mb": total - 30_000 - int(0.3 * total) - 900})
    await core.heartbeat(Heartbeat(worker_id="w1", gpus=[loaded], engines=[ready]))
    asleep = loading.model_copy(update={"state": ReplicaState.SLEEPING})
    kept = gpu(0).model_copy(update={"memory_free_mb": total - 30_000 - 3_000})
    await core.heartbeat(Heartbeat(worker_id="w1", gpus=[kept], engines=[asleep]))
    clock.now += core.settings.failed_retry_after_s
    await core.report_demand(DemandReport(router_id="r1", wake=["b"]))  # a request for `b` again
    await core.reconcile()
    assert [r.replica_id for r in core.replicas.values()] == [rid]
    info = core.model_info("b")
    assert info.state == "failed" and info.last_error is not None
    assert "gpu0: 0.31 (29875 MiB in use outside our engines)" in info.last_error


async def test_failed_engine_marks_model_failed_with_log(core: ManagerCore) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="a", model_name="/nope"))
    await core.reconcile()
    rid = (await core.heartbeat(Heartbeat(worker_id="w1"))).assignments[0].replica_id
    await core.heartbeat(
        Heartbeat(
            worker_id="w1",
            engines=[
                EngineStatus(
                    replica_id=rid,
                    alias="a",
                    state=ReplicaState.FAILED,
                    error="exited with 1",
                    log_tail=["OSError: /nope is not a directory"],
                )
            ],
        )
    )
    await core.reconcile()
    info = core.model_info("a")
    assert info.state == "failed" and "/nope is not a directory" in info.last_error
    assert info.replicas == []
    # It is not restarted in a loop.
    assert (await core.heartbeat(Heartbeat(worker_id="w1"))).assignments == []


async def test_restart_adopts_running_engines(tmp_path: Path) -> None:
    settings = ManagerSettings(db_path=str(tmp_path / "m.db"))
    first = ManagerCore(settings)
    await first.register_model(ModelSpec(alias="a", model_name="org/a", preload=False))
    await first.close()
    core = ManagerCore(settings)
    await core.start()
    running = EngineStatus(replica_id="a-1234", alias="a", state=ReplicaState.READY, model_name="org/a")
    stray = EngineStatus(replica_id="x-1", alias="unregistered", state=ReplicaState.READY)
    reply = await core.register_worker(
        WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=2, engines=[running, stray])
    )
    assert [a.replica_id for a in reply.assignments] == ["a-1234"]  # the stray engine will be stopped
    assert core.routing_table().models["a"].endpoints[0].replica_id == "a-1234"
    await core.close()


async def test_dead_worker_replicas_move(core: ManagerCore, clock: Clock) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="a", model_name="org/a"))
    await core.reconcile()
    assert core.model_info("a").replicas[0].worker_id == "w1"
    await core.register_worker(WorkerRegistration(worker_id="w2", url=NOWHERE, cpu_slots=1))
    for _ in range(21):  # w1 silent for twice the timeout while the manager runs; w2 heartbeats
        clock.now += 1
        await core.heartbeat(Heartbeat(worker_id="w2"))
        await core.reconcile()
    assert [r.worker_id for r in core.model_info("a").replicas] == ["w2"]
    assert (await core.heartbeat(Heartbeat(worker_id="w1"))).reregister


async def test_one_failed_replica_does_not_fail_a_serving_model(core: ManagerCore) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
    await core.register_worker(WorkerRegistration(worker_id="w2", url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", min_replicas=2, max_replicas=2))
    await core.reconcile()
    ids = {w: (await core.heartbeat(Heartbeat(worker_id=w))).assignments[0].replica_id for w in ("w1", "w2")}
    await core.heartbeat(
        Heartbeat(worker_id="w1", engines=[EngineStatus(replica_id=ids["w1"], alias="a", state=ReplicaState.READY)])
    )
    await core.heartbeat(
        Heartbeat(
            worker_id="w2",
            engines=[EngineStatus(replica_id=ids["w2"], alias="a", state=ReplicaState.FAILED, error="out of memory")],
        )
    )
    await core.reconcile()
    info = core.model_info("a")
    assert info.state == "ready" and info.desired_replicas == 2 and "out of memory" in info.last_error
    assert len(info.replicas) == 2  # the failed one was replaced


async def test_a_stalled_manager_does_not_declare_workers_dead(core: ManagerCore, clock: Clock) -> None:
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
    await core.reconcile()
    clock.now += 25  # the manager itself did not run for 25 s: the worker's silence is ours
    await core.reconcile()
    assert core.list_workers()[0].state == "healthy"
    for _ in range(11):  # now it really is silent, and we were running to see it
        clock.now += 1
        await core.reconcile()
    assert core.list_workers()[0].state == "unhealthy"


async def test_idle_gpu_replica_sleeps_then_wakes_on_demand(core: ManagerCore, clock: Clock) -> None:
    """The warm tier: on a worker that supports vLLM sleep, idle means asleep (not stopped); demand wakes it."""
    from serverless_vllm.schemas import DemandReport

    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)], sleep_supported=True))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", idle_timeout_s=5, gpu_memory_utilization=0.5))
    await core.reconcile()
    rid = (await core.heartbeat(Heartbeat(worker_id="g1"))).assignments[0].replica_id
    ready = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY, gpus=[0])
    await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
    for _ in range(6):  # idle past the timeout, the manager running (and the worker beating) all along
        clock.now += 1
        await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
        await core.reconcile()
    assignment = (await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))).assignments[0]
    assert assignment.replica_id == rid and assignment.asleep  # kept, asleep: its GPU claim stays
    asleep = ready.model_copy(update={"state": ReplicaState.SLEEPING})
    await core.heartbeat(Heartbeat(worker_id="g1", engines=[asleep]))
    assert core.routing_table().models["a"].state == "sleeping"
    await core.report_demand(DemandReport(router_id="r1", wake=["a"]))
    await core.reconcile()
    assignment = (await core.heartbeat(Heartbeat(worker_id="g1", engines=[asleep]))).assignments[0]
    assert assignment.replica_id == rid and not assignment.asleep  # woken, not a new cold start


async def test_cpu_worker_stops_idle_replica(core: ManagerCore, clock: Clock) -> None:
    await core.register_worker(WorkerRegistration(worker_id="c1", url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", idle_timeout_s=5))
    await core.reconcile()
    rid = (await core.heartbeat(Heartbeat(worker_id="c1"))).assignments[0].replica_id
    ready = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY)
    for _ in range(6):
        clock.now += 1
        await core.heartbeat(Heartbeat(worker_id="c1", engines=[ready]))
        await core.reconcile()
    assert (await core.heartbeat(Heartbeat(worker_id="c1", engines=[ready]))).assignments == []


async def test_a_patch_that_breaks_the_policy_is_a_400_in_one_line(core: ManagerCore) -> None:
    await core.register_model(ModelSpec(alias="a", model_name="/m", max_replicas=2))
    with pytest.raises(APIError) as refused:
        await core.patch_model("a", ModelPatch(min_replicas=3))
    # The validator's sentence, as the registration's own 400 says it: not pydantic's report of the whole spec.
    assert (refused.value.status, refused.value.code) == (400, "invalid_policy")
    assert refused.value.message == "min_replicas must not exceed max_replicas"
    assert core.model_info("a").policy.min_replicas == 0  # nothing changed
    # A registration's body is checked by the same words (the router's handler of invalid bodies).
    with pytest.raises(ValidationError) as invalid:
        ModelSpec.model_validate({"alias": "b", "model_name": "/m", "min_replicas": 3, "max_replicas": 1})
    assert validation_message(invalid.value) == "min_replicas must not exceed max_replicas"


async def test_stored_registrations_are_checked_again_at_start(tmp_path: Path) -> None:
    """A registration that no longer passes (SVLLM_MODEL_DIRS narrowed, a stored spec the schema now refuses) is
    not served after a restart, its running engine is not adopted (so its worker stops it), and the manager still
    starts; registering the alias again or deleting it clears it."""
    allowed, other = tmp_path / "models", tmp_path / "elsewhere"
    db = str(tmp_path / "m.db")
    first = ManagerCore(ManagerSettings(db_path=db, model_dirs=(str(allowed), str(other))))
    for alias, path in (("inside", allowed / "a"), ("outside", other / "b"), ("broken", allowed / "c")):
        await first.register_model(ModelSpec(alias=alias, model_name=str(path), preload=False))
    await first.close()
    with sqlite3.connect(db) as raw:  # a spec the schema refuses (as after an upgrade that tightened it)
        raw.execute("UPDATE models SET spec = json_set(spec, '$.max_model_len', -5) WHERE alias = 'broken'")

    core = ManagerCore(ManagerSettings(db_path=db, model_dirs=(str(allowed),)))
    await core.start()
    assert [m.alias for m in core.list_models()] == ["inside"]
    assert sorted(core.registry.refused) == ["broken", "outside"]
    assert "allowed model directories" in core.registry.refused["outside"]
    assert core.health()["refused_registrations"] == ["broken", "outside"]
    with pytest.raises(APIError) as err:
        core.model_info("outside")
    assert (err.value.status, err.value.code) == (404, "model_not_found") and "refused" in err.value.message
    running = EngineStatus(replica_id="outside-1", alias="outside", state=ReplicaState.READY, model_name=str(other))
    reply = await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=2, engines=[running]))
    assert reply.assignments == []  # not adopted: the worker stops it

    await core.delete_model("outside")
    await core.register_model(ModelSpec(alias="broken", model_name=str(allowed / "c2"), preload=False))
    assert core.registry.refused == {}
    await core.close()
    again = ManagerCore(ManagerSettings(db_path=db, model_dirs=(str(allowed),)))
    assert [m.alias for m in again.list_models()] == ["inside", "broken"]
    assert again.registry.refused == {}
    await again.close()
