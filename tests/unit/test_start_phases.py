"""What an operator reads while a model starts: the manager's phase lines (placed, starting, ready or failed, with
the time since the start began), the worker's "still starting" lines with the engine's last log line, and no
httpx line per request unless the log level is debug."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from serverless_vllm import cli
from serverless_vllm.config import WorkerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import (
    DemandReport,
    EngineStatus,
    Heartbeat,
    ModelSpec,
    ReplicaState,
    WorkerRegistration,
)
from serverless_vllm.worker.agent import PROGRESS_NOTE_S, WorkerAgent

from .fleet import NOWHERE, Clock, core_settings, gpu, running_core


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def core(tmp_path: Path, clock: Clock) -> AsyncIterator[ManagerCore]:
    async with running_core(core_settings(tmp_path, 600), clock) as c:
        yield c


def phases(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The manager's lines about replicas (placement and reports), in order; taken (the capture is cleared)."""
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("serverless_vllm.manager") and r.getMessage().startswith("model ")
    ]
    caplog.clear()
    return lines


async def test_a_start_is_told_in_phases_with_elapsed_time(
    core: ManagerCore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
    await core.register_model(ModelSpec(alias="tiny", model_name="org/tiny"))
    await core.reconcile()
    rid = (await core.heartbeat(Heartbeat(worker_id="w1"))).assignments[0].replica_id
    who = f"model 'tiny' replica {rid} on worker w1"
    assert phases(caplog) == [f"{who}: placed (cpu)"]

    async def beat(state: ReplicaState, after: float, **kw: str) -> None:
        clock.now += after
        engine = EngineStatus(replica_id=rid, alias="tiny", state=state, **kw)
        await core.heartbeat(Heartbeat(worker_id="w1", engines=[engine]))

    await beat(ReplicaState.STARTING, 0.4)
    for _ in range(5):  # heartbeats that change nothing say nothing
        await beat(ReplicaState.STARTING, 5.0)
    await beat(ReplicaState.READY, 2.5)
    assert phases(caplog) == [f"{who}: starting (placed 0.4 s ago)", f"{who}: ready after 27.9 s"]
    for _ in range(3):
        await beat(ReplicaState.READY, 2.0)
    assert phases(caplog) == []

    # The engine crashed and its worker starts it again: a new start, timed from there.
    await beat(ReplicaState.STARTING, 100.0)
    await beat(ReplicaState.READY, 3.0)
    assert phases(caplog) == [f"{who}: starting again (was ready)", f"{who}: ready after 3.0 s"]
    await beat(ReplicaState.STARTING, 10.0)
    await beat(ReplicaState.FAILED, 1.5, error="exited with 1")
    assert phases(caplog) == [f"{who}: starting again (was ready)", f"{who}: failed after 1.5 s"]


async def test_a_wake_is_timed_from_the_wake(core: ManagerCore, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await core.register_worker(WorkerRegistration(worker_id="g1", url=NOWHERE, gpus=[gpu(0)], sleep_supported=True))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", idle_timeout_s=5, gpu_memory_utilization=0.5))
    await core.reconcile()
    rid = (await core.heartbeat(Heartbeat(worker_id="g1"))).assignments[0].replica_id
    ready = EngineStatus(replica_id=rid, alias="a", state=ReplicaState.READY, gpus=[0])
    clock.now += 20
    await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
    who = f"model 'a' replica {rid} on worker g1"
    assert phases(caplog) == [f"{who}: placed (gpus 0)", f"{who}: ready after 20.0 s"]
    for _ in range(20):  # idle until put to sleep
        if (await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))).assignments[0].asleep:
            break
        clock.now += 1
        await core.reconcile()
    else:
        pytest.fail("the idle replica was never put to sleep")
    asleep = ready.model_copy(update={"state": ReplicaState.SLEEPING})
    await core.heartbeat(Heartbeat(worker_id="g1", engines=[asleep]))
    caplog.clear()
    await core.report_demand(DemandReport(router_id="r1", wake=["a"]))
    await core.reconcile()
    await core.heartbeat(Heartbeat(worker_id="g1", engines=[asleep]))  # not woken yet
    clock.now += 1.5
    await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
    assert phases(caplog) == [f"{who}: waking", f"{who}: ready after 1.5 s"]


# --------------------------------------------------------------------------- worker: still starting


class StandInEngine:
    def __init__(self, replica_id: str, state: ReplicaState, log: list[str]) -> None:
        self.replica_id, self.alias, self.state, self._log = replica_id, "tiny", state, log

    def log_tail(self, n: int = 50) -> list[str]:
        return self._log[-n:]


def test_worker_says_an_engine_is_still_starting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serverless_vllm.worker.agent")
    agent = WorkerAgent(WorkerSettings(worker_id="w1", log_dir=str(tmp_path)))
    slow = StandInEngine("r1", ReplicaState.STARTING, ["INFO Loading weights took 0.01 s   "])
    quiet = StandInEngine("r2", ReplicaState.STARTING, [])
    done = StandInEngine("r3", ReplicaState.READY, ["serving"])
    agent.engines = {"r1": slow, "r2": quiet, "r3": done}  # type: ignore[dict-item]

    def notes(now: float) -> list[str]:
        agent.note_progress(now)
        lines = [r.getMessage() for r in caplog.records if "still starting" in r.getMessage()]
        caplog.clear()
        return lines

    assert notes(100.0) == []  # first seen starting
    assert notes(100.0 + PROGRESS_NOTE_S - 1) == []
    assert notes(100.0 + PROGRESS_NOTE_S) == [
        "engine r1 (tiny): still starting after 30 s; its log: INFO Loading weights took 0.01 s",
        "engine r2 (tiny): still starting after 30 s",
    ]
    assert notes(100.0 + PROGRESS_NOTE_S + 10) == []  # one line per engine every PROGRESS_NOTE_S
    slow.state = ReplicaState.READY
    assert notes(100.0 + 2 * PROGRESS_NOTE_S) == ["engine r2 (tiny): still starting after 60 s"]
    slow.state = ReplicaState.STARTING  # started again: timed afresh
    assert notes(200.0) == ["engine r2 (tiny): still starting after 100 s"]
    assert notes(200.0 + PROGRESS_NOTE_S) == [
        "engine r1 (tiny): still starting after 30 s; its log: INFO Loading weights took 0.01 s",
        "engine r2 (tiny): still starting after 130 s",
    ]


# --------------------------------------------------------------------------- httpx's line per request


@pytest.fixture
def restore_levels() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(("level", "logged"), [("info", False), ("warning", False), ("debug", True), ("DEBUG", True)])
def test_http_requests_are_logged_at_debug_only(
    level: str, logged: bool, restore_levels: None, caplog: pytest.LogCaptureFixture
) -> None:
    cli._setup_logging(level)
    caplog.set_level(logging.DEBUG)  # the handler takes everything: what is left out is left out at the loggers
    caplog.handler.setLevel(logging.DEBUG)
    logging.getLogger().setLevel(logging.getLevelName(level.upper()))
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
        client.post("http://manager/workers/heartbeat", json={})
    requests = [r for r in caplog.records if r.getMessage().startswith("HTTP Request:")]
    assert bool(requests) is logged, [r.getMessage() for r in caplog.records]
    assert not logging.getLogger("httpcore").isEnabledFor(logging.DEBUG)  # its trace (a dozen lines): never
    assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)  # its warnings: always
