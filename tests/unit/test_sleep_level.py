"""Sleep levels (issue 18): the manager's choice from a worker's host memory and its engines' weights
(manager/sleep_level.py), what carries it (registration, heartbeats, assignments, GET /v1/models/{alias}), and what
the worker measures (worker/host_memory.py)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from serverless_vllm.config import ManagerSettings, WorkerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.manager.http_app import create_app
from serverless_vllm.manager.replicas import Replica
from serverless_vllm.manager.sleep_level import choose_sleep_level, weights_bound
from serverless_vllm.manager.workers import WorkerRecord
from serverless_vllm.schemas import (
    Assignment,
    EngineArgs,
    EngineStatus,
    Heartbeat,
    HostMemory,
    ModelSpec,
    ReplicaState,
    WorkerRegistration,
)
from serverless_vllm.worker.agent import WorkerAgent
from serverless_vllm.worker.gpus import GPUProbe
from serverless_vllm.worker.host_memory import host_memory, weights_bytes

from ..fake_nvml import FakeGPU, FakeNVML
from .fleet import NOWHERE, Clock, gpu

GIB = 1 << 30
H100_BYTES = 81559 * (1 << 20)  # fleet.gpu()'s memory


def record(available_gib: float | None, *engines: EngineStatus) -> WorkerRecord:
    memory = (
        None if available_gib is None else HostMemory(total_bytes=512 * GIB, available_bytes=int(available_gib * GIB))
    )
    reg = WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0), gpu(1)], sleep_supported=True)
    return WorkerRecord(
        registration=reg,
        last_heartbeat=0.0,
        gpus=[gpu(0), gpu(1)],
        engines={e.replica_id: e for e in engines},
        host_memory=memory,
    )


def replica(rid: str, *, asleep: bool = False, level: int = 1, gpus: tuple[int, ...] = (0,)) -> Replica:
    return Replica(rid, "m", "g1", list(gpus), 0.5, ReplicaState.READY, asleep=asleep, sleep_level=level)


def engine(
    rid: str, weights_gib: float | None, state: ReplicaState = ReplicaState.READY, level: int | None = None
) -> EngineStatus:
    size = None if weights_gib is None else int(weights_gib * GIB)
    return EngineStatus(replica_id=rid, alias="m", state=state, weights_bytes=size, sleep_level=level)


# ----------------------------------------------------------------------------------------------- the choice


def test_level_1_when_the_weights_fit_in_the_fraction_of_available_memory() -> None:
    r = replica("r1")
    assert choose_sleep_level(r, record(100, engine("r1", 80)), [r], 0.8) == 1  # 80 <= 0.8 x 100
    assert choose_sleep_level(r, record(100, engine("r1", 81)), [r], 0.8) == 2  # 81 > 80: dropped, not offloaded
    assert choose_sleep_level(r, record(100, engine("r1", 81)), [r], 0.9) == 1  # the setting moves the line


def test_the_replicas_already_asleep_at_level_1_count() -> None:
    """Two of 30 GiB each on 100 GiB: the first asleep (its weights out of `available`), the second fits beside it;
    a third does not, and goes to level 2. Replicas asleep at level 2 hold no host memory and do not count."""
    first, second, third = replica("r1", asleep=True), replica("r2", asleep=True), replica("r3")
    on_worker = [first, second, third]
    a = engine("r1", 30, ReplicaState.SLEEPING, level=1)  # offloaded: the worker measured 70 GiB available
    assert choose_sleep_level(second, record(70, a, engine("r2", 30)), [first, second], 0.8) == 1  # 60 <= 80
    b = engine("r2", 30, ReplicaState.SLEEPING, level=1)
    assert choose_sleep_level(third, record(40, a, b, engine("r3", 30)), on_worker, 0.8) == 2  # 90 > 0.8 x 100
    second.sleep_level = 2  # had it gone to level 2 instead, its weights would be on disk only
    b2 = engine("r2", 30, ReplicaState.SLEEPING, level=2)
    assert choose_sleep_level(third, record(70, a, b2, engine("r3", 30)), on_worker, 0.8) == 1  # 60 <= 80
    # Decided but not yet asleep (the worker has not reported it so): its weights are still in `available`, and
    # still claimed against the budget, so two decisions in one pass do not both take the same memory.
    fresh = replica("r4", asleep=True)
    fourth = engine("r4", 50)
    assert choose_sleep_level(third, record(100, fourth, engine("r3", 40)), [fresh, third], 0.8) == 2  # 90 > 80


def test_an_unknown_size_counts_as_the_gpu_memory_the_replica_may_use() -> None:
    r = replica("r1")  # gpu_memory_utilization 0.5 of one H100: at most 39.8 GiB of weights
    assert weights_bound(r, record(100, engine("r1", None))) == int(H100_BYTES * 0.5)
    assert choose_sleep_level(r, record(100, engine("r1", None)), [r], 0.8) == 1  # 39.8 GiB <= 80 GiB
    assert choose_sleep_level(r, record(40, engine("r1", None)), [r], 0.8) == 2  # 39.8 GiB > 32 GiB
    two = replica("r2", gpus=(0, 1))  # tensor parallel: its share of both GPUs
    assert weights_bound(two, record(100)) == int(2 * H100_BYTES * 0.5)
    assert choose_sleep_level(r, record(40, engine("r1", 1)), [r], 0.8) == 1  # a measured size wins


def test_a_worker_that_reports_no_host_memory_gets_level_1() -> None:
    r = replica("r1")
    assert choose_sleep_level(r, record(None, engine("r1", 10_000)), [r], 0.8) == 1


# ------------------------------------------------------------------ through the manager, its HTTP API and the model


async def test_idle_replicas_sleep_at_the_chosen_level_over_http(tmp_path: Path) -> None:
    """Registration and heartbeats carry the host memory and the weights (JSON, through the manager's HTTP API);
    the assignment carries the level; GET /v1/models/{alias} and /workers show them."""
    clock = Clock()
    core = ManagerCore(
        ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"], sleep_host_memory_fraction=0.8),
        clock=clock,
        client=httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))),
        worker_headers={},
    )
    app = create_app(core.settings, core=core)
    await core.start()
    memory = HostMemory(total_bytes=128 * GIB, available_bytes=100 * GIB)
    at_start = HostMemory(total_bytes=128 * GIB, available_bytes=GIB)  # heartbeats say how it is now
    reg = WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)], sleep_supported=True, host_memory=at_start)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as http:

        async def beat(engines: list[EngineStatus]) -> dict[str, Assignment]:
            hb = Heartbeat(worker_id="g1", gpus=[gpu(0)], engines=engines, host_memory=memory)
            resp = await http.post("/workers/heartbeat", json=hb.model_dump(mode="json"))
            assert resp.status_code == 200, resp.text
            return {a["alias"]: Assignment.model_validate(a) for a in resp.json()["assignments"]}

        assert (await http.post("/workers/register", json=reg.model_dump(mode="json"))).status_code == 200
        assert (await http.get("/workers")).json()[0]["host_memory"] == at_start.model_dump()
        for alias, name in (("small", "org/small"), ("big", "org/big")):
            spec = ModelSpec(alias=alias, model_name=name, idle_timeout_s=5, gpu_memory_utilization=0.4)
            await core.register_model(spec)
        await core.reconcile()
        placed = await beat([])
        weights = {"small": 2 * GIB, "big": 90 * GIB}  # 90 GiB > 0.8 x 100 GiB
        ready = [
            EngineStatus(
                replica_id=a.replica_id,
                alias=alias,
                state=ReplicaState.READY,
                gpus=a.gpus,
                weights_bytes=weights[alias],
            )
            for alias, a in placed.items()
        ]
        await beat(ready)
        for _ in range(6):  # idle past the timeout
            clock.now += 1
            await beat(ready)
            await core.reconcile()
        asleep = await beat(ready)
        assert asleep["small"].asleep and asleep["small"].sleep_level == 1
        assert asleep["big"].asleep and asleep["big"].sleep_level == 2
        sleeping = [
            s.model_copy(update={"state": ReplicaState.SLEEPING, "sleep_level": asleep[s.alias].sleep_level})
            for s in ready
        ]
        await beat(sleeping)
        for alias, level in (("small", 1), ("big", 2)):
            info = core.model_info(alias)
            assert info.state == "sleeping" and [r.sleep_level for r in info.replicas] == [level]
        workers = (await http.get("/workers")).json()
        assert workers[0]["host_memory"] == memory.model_dump()
        assert {e["alias"]: e["weights_bytes"] for e in workers[0]["engines"]} == weights
    await core.close()


async def test_an_adopted_sleeping_engine_keeps_its_level(tmp_path: Path) -> None:
    """After a manager restart, an engine asleep at level 2 is adopted as such (a wake must reload its weights)."""
    core = ManagerCore(ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"]), clock=Clock())
    await core.start()
    await core.register_model(ModelSpec(alias="big", model_name="org/big", gpu_memory_utilization=0.4, preload=False))
    status = EngineStatus(
        replica_id="big-1", alias="big", state=ReplicaState.SLEEPING, gpus=[0], model_name="org/big", sleep_level=2
    )
    await core.register_worker(
        WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)], sleep_supported=True, engines=[status])
    )
    assert [(r.asleep, r.sleep_level) for r in core.model_info("big").replicas] == [(True, 2)]
    assert (await core.heartbeat(Heartbeat(worker_id="g1", engines=[status]))).assignments[0].sleep_level == 2
    await core.close()


# ------------------------------------------------------------------------------------ what the worker measures


def test_host_memory_from_meminfo_capped_by_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(
        "MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   32768000 kB\nHugePages_Total: 0\n"
    )
    assert host_memory(str(tmp_path)) == HostMemory(total_bytes=65536000 * 1024, available_bytes=32768000 * 1024)
    cgroup = tmp_path / "sys" / "fs" / "cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(f"{16 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{10 * GIB}\n")
    assert host_memory(str(tmp_path)) == HostMemory(total_bytes=16 * GIB, available_bytes=6 * GIB)
    (cgroup / "memory.max").write_text("max\n")  # no limit: the machine's
    assert host_memory(str(tmp_path)).total_bytes == 65536000 * 1024
    real = host_memory()  # this machine
    assert 0 < real.available_bytes <= real.total_bytes


def test_weights_of_a_local_folder_and_of_the_hub_cache(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x" * 500)
    assert weights_bytes(str(folder), {}) == 500  # only .bin files: vLLM loads those
    for i in (1, 2):
        (folder / f"model-0000{i}-of-00002.safetensors").write_bytes(b"x" * 100 * i)
    assert weights_bytes(str(folder), {}) == 300  # safetensors there: vLLM loads those, not the .bin
    assert weights_bytes(str(tmp_path / "missing"), {}) is None
    # A hub id in the Hugging Face cache: snapshots hold links to blobs.
    repo = tmp_path / "hf" / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"x" * 4096)
    for rev in ("old", "cafe"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "snapshots" / "old" / "model.safetensors").write_bytes(b"x" * 7)
    os.symlink(repo / "blobs" / "abc", repo / "snapshots" / "cafe" / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("cafe")
    newer = (repo / "snapshots" / "cafe").stat().st_mtime + 100
    os.utime(repo / "snapshots" / "old", (newer, newer))  # the newest snapshot is not the one refs/main names
    assert weights_bytes("org/name", {"HF_HOME": str(tmp_path / "hf")}) == 4096
    assert weights_bytes("org/name", {"HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}) == 4096
    hf = {"HF_HOME": str(tmp_path / "hf")}
    (repo / "refs" / "v1").write_text("old")  # a tag
    assert (weights_bytes("org/name", hf, "v1"), weights_bytes("org/name", hf, "cafe")) == (7, 4096)  # tag, commit
    assert weights_bytes("org/name", hf, "v2") is None  # that revision is not in the cache
    (repo / "refs" / "main").unlink()  # no ref: the newest snapshot
    assert weights_bytes("org/name", hf) == 7
    assert weights_bytes("org/other", {"HF_HOME": str(tmp_path / "hf")}) is None  # not downloaded (yet)


async def test_a_gpu_worker_reports_its_memory_and_its_engines_weights(tmp_path: Path) -> None:
    """The agent with NVML's test double (one GPU): host memory in registration and heartbeats, each engine's
    weights once it has loaded them."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 1234)
    settings = WorkerSettings.model_validate({"worker_id": "g1", "log_dir": str(tmp_path / "logs")})
    agent = WorkerAgent(settings, probe=GPUProbe(nvml=FakeNVML(gpus=[FakeGPU()])))
    agent.gpus = agent._probe.detect()
    reg = agent.registration()
    assert reg.sleep_supported and reg.host_memory is not None and reg.host_memory.total_bytes > 0
    from serverless_vllm.worker.engine import EngineProcess

    a = Assignment(replica_id="r1", alias="m", model_name=str(folder), engine=EngineArgs(), gpus=[0])
    eng = EngineProcess(a, settings, has_gpu=True)
    agent.engines["r1"] = eng
    assert agent.statuses()[0].weights_bytes is None  # still starting: not measured yet
    eng._state = ReplicaState.READY
    assert agent.statuses()[0].weights_bytes == 1234
    (folder / "model.safetensors").write_bytes(b"x")  # measured once per engine
    assert agent.statuses()[0].weights_bytes == 1234
    del agent.engines["r1"]
    assert agent.statuses() == [] and agent._weights._sizes == {}


@pytest.mark.parametrize("level", [1, 2])
def test_the_assignment_level_is_bounded(level: int) -> None:
    a = Assignment(replica_id="r", alias="m", model_name="org/m", engine=EngineArgs(), asleep=True, sleep_level=level)
    assert Assignment.model_validate_json(a.model_dump_json()).sleep_level == level
    with pytest.raises(ValueError):
        Assignment(replica_id="r", alias="m", model_name="org/m", engine=EngineArgs(), sleep_level=3)
