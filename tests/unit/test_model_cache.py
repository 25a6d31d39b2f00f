"""The manager's side of the model cache (manager/model_cache.py): which workers are asked to prefetch a hub model,
what their reports show (GET /v1/models/{alias}, the phase, the metrics) and what a failed download does to its
model. The workers' side, against a stand-in hub, is tests/test_prefetch.py; both together in tests/test_model_cache.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from serverless_vllm import cli
from serverless_vllm.config import ManagerSettings
from serverless_vllm.errors import APIError
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import (
    CacheFault,
    CacheState,
    CacheStatus,
    EngineStatus,
    Heartbeat,
    HeartbeatReply,
    ModelSpec,
    PrefetchOrder,
    ReplicaState,
    WorkerRegistration,
)

from .fleet import NOWHERE, Clock, gpu, running_core

NOT_FOUND = "repository 'org/m' not found on http://hub (a private one needs HF_TOKEN on the workers)"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings(tmp_path: Path, **kw: object) -> ManagerSettings:
    return ManagerSettings.model_validate(
        {"db_path": str(tmp_path / "m.db"), "heartbeat_timeout_s": 10, "model_dirs": ["/"], **kw}
    )


@pytest.fixture
async def core(tmp_path: Path, clock: Clock) -> AsyncIterator[ManagerCore]:
    async with running_core(settings(tmp_path), clock) as c:
        yield c


async def cpu_workers(core: ManagerCore, *ids: str) -> None:
    for worker_id in ids:
        await core.register_worker(WorkerRegistration(worker_id=worker_id, url=NOWHERE, cpu_slots=2))


def orders(reply: HeartbeatReply) -> list[tuple[str, str | None]]:
    return [(o.model_name, o.revision) for o in reply.prefetch]


def status(state: CacheState, model: str = "org/m", **kw: object) -> CacheStatus:
    return CacheStatus.model_validate({"model_name": model, "state": state, **kw})


async def beat(core: ManagerCore, worker_id: str, *cache: CacheStatus, **kw: object) -> HeartbeatReply:
    return await core.heartbeat(Heartbeat.model_validate({"worker_id": worker_id, "cache": list(cache), **kw}))


async def test_a_registration_asks_the_workers_placement_would_choose(core: ManagerCore) -> None:
    await cpu_workers(core, "w1", "w2", "w3")
    await core.register_model(ModelSpec(alias="busy", model_name="/models/busy", min_replicas=1))
    await core.reconcile()  # busy runs on w1: placement would put a new model elsewhere first
    busy_on = core.model_info("busy").replicas[0].worker_id
    await core.register_model(ModelSpec(alias="m", model_name="org/m", max_replicas=4, preload=False))
    chosen = {w for w in ("w1", "w2", "w3") if orders(await beat(core, w)) == [("org/m", None)]}
    assert len(chosen) == 2 and busy_on not in chosen  # PREFETCH_WORKERS=2, the least busy first
    assert set(core.model_info("m").cache) == chosen
    assert {p.state for p in core.model_info("m").cache.values()} == {CacheState.QUEUED}
    # At most max_replicas workers; a revision travels with the order; local paths are not prefetched.
    await core.register_model(ModelSpec(alias="one", model_name="org/one", revision="v2", preload=False))
    replies = [await beat(core, w) for w in ("w1", "w2", "w3")]
    assert sum(("org/one", "v2") in orders(r) for r in replies) == 1
    assert core.model_info("busy").cache == {}
    assert all(("/models/busy", None) not in orders(r) for r in replies)


async def test_no_prefetch_when_switched_off(tmp_path: Path, clock: Clock) -> None:
    core = ManagerCore(settings(tmp_path, prefetch_workers=0), clock=clock)
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m", preload=False))
    assert orders(await beat(core, "w1")) == [] and core.model_info("m").cache == {}
    await core.close()


async def test_gpu_workers_first_and_only_those_that_could_run_it(core: ManagerCore) -> None:
    await cpu_workers(core, "c1")
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)]))
    await core.register_worker(WorkerRegistration(worker_id="g2", url=NOWHERE, gpus=[gpu(0), gpu(1)]))
    await core.register_model(ModelSpec(alias="tp2", model_name="org/tp2", tensor_parallel_size=2, preload=False))
    assert set(core.model_info("tp2").cache) == {"g2"}  # nobody else has two GPUs
    await core.register_model(ModelSpec(alias="m", model_name="org/m", max_replicas=2, preload=False))
    assert set(core.model_info("m").cache) == {"g1", "g2"}


async def test_a_hub_adapter_is_prefetched_where_its_base_runs(core: ManagerCore) -> None:
    await cpu_workers(core, "c1")
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)]))
    await core.register_worker(WorkerRegistration(worker_id="g2", url=NOWHERE, gpus=[gpu(0), gpu(1)]))
    await core.register_model(ModelSpec(alias="base", model_name="org/base", max_replicas=1, preload=False))
    (base_on,) = core.model_info("base").cache
    await core.register_model(ModelSpec(alias="ad", base="base", adapter="org/ad"))
    assert set(core.model_info("ad").cache) == {base_on}  # its base's targets (its own max_replicas is every one)
    assert ("org/ad", None) in orders(await beat(core, base_on))
    # A base from a local path has no targets: where placement would put the base (two GPUs: g2 alone).
    await core.register_model(ModelSpec(alias="tp2", model_name="/models/tp2", tensor_parallel_size=2, preload=False))
    await core.register_model(ModelSpec(alias="ad2", base="tp2", adapter="org/ad2"))
    assert set(core.model_info("ad2").cache) == {"g2"}
    await core.register_model(ModelSpec(alias="ad3", base="base", adapter="/models/ad3"))  # a path: nothing to fetch
    assert core.model_info("ad3").cache == {}


async def test_reports_show_progress_phase_and_metrics(core: ManagerCore) -> None:
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m"))  # preload: a replica on w1 at once
    await core.reconcile()
    await beat(core, "w1", status(CacheState.FETCHING, bytes=300, total=1000))
    info = core.model_info("m")
    assert info.cache["w1"].model_dump() == {"state": "fetching", "bytes": 300, "total": 1000, "error": None}
    assert info.state == "loading" and info.phase == "prefetching"  # its engine waits for the files
    text = (await core.metrics_text()).decode()
    assert 'svllm_model_cache_state{model="m",worker="w1",state="fetching"} 1.0' in text
    assert 'svllm_model_cache_bytes{model="m",worker="w1"} 300.0' in text
    assert 'svllm_model_cache_total_bytes{model="m",worker="w1"} 1000.0' in text
    await beat(core, "w1", status(CacheState.CACHED, bytes=1000, total=1000))
    info = core.model_info("m")
    assert info.cache["w1"].state == "cached" and info.phase == "starting"
    assert 'svllm_model_cache_state{model="m",worker="w1",state="cached"} 1.0' in (await core.metrics_text()).decode()


async def test_a_bad_source_fails_the_model_at_once(core: ManagerCore) -> None:
    await cpu_workers(core, "w1", "w2")
    await core.register_model(ModelSpec(alias="m", model_name="org/m"))
    await core.register_model(ModelSpec(alias="m-embed", model_name="org/m", task="embed", preload=False))
    await core.reconcile()
    assert core.model_info("m").state == "loading"
    worker = core.model_info("m").replicas[0].worker_id
    failed = status(CacheState.FAILED, error=NOT_FOUND, fault=CacheFault.SOURCE)
    await beat(core, worker, failed)
    for alias in ("m", "m-embed"):  # every registration of that repository
        info = core.model_info(alias)
        assert info.state == "failed" and info.replicas == [], alias
        assert info.last_error == f"worker {worker} cannot cache org/m: {NOT_FOUND}"
    assert core.routing_table().models["m"].error == core.model_info("m").last_error
    await core.reconcile()
    assert (await beat(core, worker, failed)).assignments == []  # its engine is stopped
    # Registered again (deleted first) while the worker still says so: failed at once, not after an engine start.
    await core.delete_model("m")
    await core.register_model(ModelSpec(alias="m", model_name="org/m"))
    assert core.model_info("m").state == "failed" and NOT_FOUND in (core.model_info("m").last_error or "")


async def test_a_failed_prefetch_keeps_a_serving_model_serving(core: ManagerCore) -> None:
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m"))
    await core.reconcile()
    rid = (await beat(core, "w1")).assignments[0].replica_id
    ready = EngineStatus(replica_id=rid, alias="m", state=ReplicaState.READY)
    await beat(core, "w1", status(CacheState.FAILED, error=NOT_FOUND, fault=CacheFault.SOURCE), engines=[ready])
    info = core.model_info("m")
    assert info.state == "ready" and len(info.replicas) == 1 and NOT_FOUND in (info.last_error or "")


async def test_a_worker_fault_fails_the_model_only_when_no_worker_can_cache_it(core: ManagerCore) -> None:
    await cpu_workers(core, "w1", "w2")
    await core.register_model(ModelSpec(alias="m", model_name="org/m", max_replicas=2, preload=False))
    full = "not enough disk space on this worker for 'org/m': 14.90 GiB to download, 2.00 GiB free"
    await beat(core, "w1", status(CacheState.FAILED, error=full, fault=CacheFault.WORKER))
    info = core.model_info("m")
    assert info.state == "cold" and info.last_error == f"worker w1 cannot cache org/m: {full}"  # w2 may still
    await beat(core, "w2", status(CacheState.FAILED, error=full, fault=CacheFault.WORKER))
    assert core.model_info("m").state == "failed"


async def test_other_errors_are_shown_and_fail_nothing(core: ManagerCore) -> None:
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m", max_replicas=1, preload=False))
    down = "cannot reach http://hub to download 'org/m': ConnectError: [Errno 111] Connection refused"
    await beat(core, "w1", status(CacheState.FAILED, error=down, fault=CacheFault.OTHER))
    info = core.model_info("m")
    assert info.state == "cold" and down in (info.last_error or "") and info.cache["w1"].state == "failed"


async def test_a_dead_target_is_replaced_by_the_next_worker_to_join(core: ManagerCore, clock: Clock) -> None:
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m", preload=False))
    assert set(core.model_info("m").cache) == {"w1"}  # the only worker there is
    for _ in range(21):  # silent for twice the heartbeat timeout: dead
        clock.now += 1
        await core.reconcile()
    assert core.model_info("m").cache == {}
    await cpu_workers(core, "w2")
    assert orders(await beat(core, "w2")) == [("org/m", None)]
    await cpu_workers(core, "w3")
    assert orders(await beat(core, "w3")) == []  # w2 took the place; max_replicas is 1


async def test_a_worker_joining_takes_the_places_no_worker_could_take_before(core: ManagerCore) -> None:
    await core.register_model(ModelSpec(alias="m", model_name="org/m", max_replicas=2, preload=False))
    assert core.model_info("m").cache == {}  # no worker yet
    await cpu_workers(core, "w1")
    assert orders(await beat(core, "w1")) == [("org/m", None)]
    await cpu_workers(core, "w2")
    assert orders(await beat(core, "w2")) == [("org/m", None)]
    await cpu_workers(core, "w3")
    assert orders(await beat(core, "w3")) == []  # two are enough
    await cpu_workers(core, "w1")  # registers again (restarted): still one of the two, not three
    assert set(core.model_info("m").cache) == {"w1", "w2"}


async def test_after_a_manager_restart_the_workers_keep_their_prefetches(tmp_path: Path) -> None:
    first = ManagerCore(settings(tmp_path))
    await cpu_workers(first, "w1")
    await first.register_model(ModelSpec(alias="m", model_name="org/m", preload=False))
    await first.register_model(ModelSpec(alias="other", model_name="org/other", preload=False))
    await first.close()
    second = ManagerCore(settings(tmp_path))
    reg = WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=2, cache=[status(CacheState.CACHED, bytes=9)])
    reply = await second.register_worker(reg)
    assert orders(reply) == [("org/m", None)]  # what it says it was asked for, not every registered model
    assert second.model_info("m").cache["w1"].state == "cached"
    await cpu_workers(second, "w2")
    assert orders(await beat(second, "w2")) == []
    await second.close()


async def test_a_deleted_model_is_no_longer_prefetched(core: ManagerCore) -> None:
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m", preload=False))
    assert orders(await beat(core, "w1", status(CacheState.FETCHING))) == [("org/m", None)]
    await core.delete_model("m")
    reply = await beat(core, "w1", status(CacheState.FETCHING))
    assert reply.prefetch == [] and "prefetch" not in reply.model_dump()  # an empty list is not sent


async def test_revision_is_checked_and_reaches_the_engine(core: ManagerCore) -> None:
    await cpu_workers(core, "w1")
    await core.register_model(ModelSpec(alias="m", model_name="org/m", revision="refs/pr/1"))
    await core.reconcile()
    reply = await beat(core, "w1")
    assert reply.assignments[0].engine.revision == "refs/pr/1"
    assert reply.prefetch == [PrefetchOrder(model_name="org/m", revision="refs/pr/1")]
    for bad in (
        ModelSpec(alias="x", model_name="/models/x", revision="main"),  # a local folder has no revisions
        ModelSpec(alias="x", model_name="org/x", revision="a/../../etc"),  # a file name under the cache's refs/
        ModelSpec(alias="x", model_name="org/x", extra_args=["--revision", "main"]),  # the field's, not extra_args'
    ):
        with pytest.raises(APIError) as err:
            await core.register_model(bad)
        assert err.value.status == 400
    with pytest.raises(ValueError):
        ModelSpec(alias="x", model_name="org/x", revision="-rf")


def test_svllm_register_sends_the_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, object]] = []

    async def register(url: str, body: dict[str, object], auth: object = None) -> dict[str, object]:
        sent.append(body)
        return {**body, "state": "cold"}

    monkeypatch.setattr(cli, "register_model", register)
    cli.main(["register", "--url", "http://r:1", "--model", "org/m", "--revision", "v2"])
    assert sent == [{"alias": "m", "model_name": "org/m", "revision": "v2"}]


def test_the_engine_loads_the_registered_revision(tmp_path: Path) -> None:
    from serverless_vllm.config import WorkerSettings
    from serverless_vllm.schemas import Assignment, EngineArgs
    from serverless_vllm.worker.engine import EngineProcess

    def command(revision: str | None) -> list[str]:
        engine = EngineArgs(revision=revision)
        assignment = Assignment(replica_id="r", alias="m", model_name="org/m", engine=engine)
        return EngineProcess(assignment, WorkerSettings(log_dir=str(tmp_path)), has_gpu=False).command(8000)

    cmd = command("v2")
    assert cmd[cmd.index("--revision") + 1] == "v2"
    assert "--revision" not in command(None)
