"""Draining on the worker (worker/drain.py): an engine leaving is out of service at once, stopped only once its
requests in flight are done or the drain timeout passed; a new engine waits for the GPU memory of the engines
draining on its GPUs; an engine put to sleep finishes its requests first. The manager's side:
tests/unit/test_draining.py; with real processes: tests/test_draining.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from serverless_vllm.config import WorkerSettings
from serverless_vllm.schemas import Assignment, CacheState, EngineArgs, EngineStatus, ReplicaState
from serverless_vllm.worker import agent as agent_module
from serverless_vllm.worker.agent import WorkerAgent
from serverless_vllm.worker.drain import Drainer, InFlight


def assignment(rid: str, gpus: list[int] | None = None, fraction: float = 0.9, asleep: bool = False) -> Assignment:
    return Assignment(
        replica_id=rid,
        alias="a",
        model_name="/models/a",  # a local path: nothing for the prefetcher to have (a hub id: test below)
        engine=EngineArgs(gpu_memory_utilization=fraction),
        gpus=gpus or [],
        asleep=asleep,
    )


class FakeEngine:
    """What the drain and the agent use of an EngineProcess; its stop and sleep only record when they happened."""

    def __init__(self, a: Assignment, *args: Any, **kwargs: Any) -> None:
        self.assignment = a
        self.replica_id, self.alias = a.replica_id, a.alias
        self.state = ReplicaState.READY
        self.stopped_at: float | None = None
        self.slept: int | None = None
        self.restarts = 0
        self.log_path = Path("/dev/null")

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    async def start(self) -> None:
        self.state = ReplicaState.STARTING

    async def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self.state = ReplicaState.STOPPING

    async def sleep(self, level: int) -> None:
        self.slept, self.state = level, ReplicaState.SLEEPING

    def status(self) -> EngineStatus:
        return EngineStatus(replica_id=self.replica_id, alias=self.alias, state=self.state)


def engine(rid: str, gpus: list[int] | None = None, fraction: float = 0.9) -> Any:
    return FakeEngine(assignment(rid, gpus, fraction))


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- requests in flight


async def test_in_flight_counts_each_request_once_and_says_when_idle() -> None:
    inflight = InFlight()
    inflight.enter("r")
    inflight.enter("r")
    assert inflight.count("r") == 2
    inflight.leave("r")
    assert inflight.count("r") == 1
    assert not await inflight.wait_idle("r", 0.05)  # still one: the wait times out
    asyncio.get_running_loop().call_later(0.05, inflight.leave, "r")
    assert await inflight.wait_idle("r", 5)
    assert inflight.count("r") == 0 and await inflight.wait_idle("r", 0)


# --------------------------------------------------------------------------- the drain


async def test_an_engine_is_stopped_only_once_its_requests_are_done() -> None:
    inflight, gone = InFlight(), []
    drainer = Drainer(inflight, timeout_s=30, on_gone=lambda: gone.append(1))
    e = engine("r1")
    inflight.enter("r1")
    inflight.enter("r1")
    drainer.drain(e)
    await asyncio.sleep(0.3)
    assert not e.stopped and [s.state for s in drainer.statuses()] == [ReplicaState.STOPPING]
    inflight.leave("r1")
    await asyncio.sleep(0.1)
    assert not e.stopped  # one still in flight
    done_at = time.monotonic()
    inflight.leave("r1")
    await until(lambda: e.stopped)
    assert e.stopped_at - done_at < 0.5
    await drainer.wait()
    assert drainer.engines == {} and drainer.statuses() == [] and gone == [1]


async def test_an_idle_engine_is_stopped_at_once() -> None:
    drainer = Drainer(InFlight(), timeout_s=30, on_gone=lambda: None)
    e = engine("r1")
    began = time.monotonic()
    drainer.drain(e)
    await drainer.wait()
    assert e.stopped_at - began < 0.2


async def test_the_drain_timeout_bounds_the_wait() -> None:
    inflight = InFlight()
    drainer = Drainer(inflight, timeout_s=0.5, on_gone=lambda: None)
    e = engine("r1")
    inflight.enter("r1")  # never ends by itself
    began = time.monotonic()
    drainer.drain(e)
    async with asyncio.timeout(5):  # an unbounded drain fails here, not at the suite's timeout
        await drainer.wait()
    assert 0.45 <= e.stopped_at - began < 1.5


async def test_closing_stops_every_engine_being_drained_now() -> None:
    inflight = InFlight()
    drainer = Drainer(inflight, timeout_s=30, on_gone=lambda: None)
    e = engine("r1")
    inflight.enter("r1")
    drainer.drain(e)
    await asyncio.sleep(0.05)
    await drainer.close()
    assert e.stopped and drainer.engines == {}


# --------------------------------------------------------------------------- GPU memory


def test_a_new_engine_waits_for_room_beside_the_engines_draining_on_its_gpu() -> None:
    drainer = Drainer(InFlight(), timeout_s=30, on_gone=lambda: None)
    drainer.engines["old"] = engine("old", [0], 0.9)
    assert not drainer.room_for(assignment("new", [0], 0.9), [])
    assert drainer.room_for(assignment("new", [1], 0.9), [])  # another GPU: at once
    assert drainer.room_for(assignment("cpu", [], 0.9), [])
    drainer.engines["old"] = engine("old", [0], 0.4)
    assert drainer.room_for(assignment("new", [0], 0.4), [])  # fits beside it
    assert not drainer.room_for(assignment("new", [0], 0.4), [engine("running", [0], 0.5)])
    drainer.engines.clear()
    # Nothing draining there: the manager's placement decides, as before.
    assert drainer.room_for(assignment("new", [0], 0.9), [engine("running", [0], 0.5)])


# --------------------------------------------------------------------------- the agent


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerAgent:
    monkeypatch.setattr(agent_module, "EngineProcess", FakeEngine)
    settings = WorkerSettings(
        worker_id="w1", log_dir=str(tmp_path), drain_timeout_s=30, manager_url="http://127.0.0.1:9"
    )
    return WorkerAgent(settings)


async def test_an_unassigned_engine_is_refused_new_requests_and_stopped_once_idle(agent: WorkerAgent) -> None:
    await agent.apply([assignment("r1")])
    e = agent.engines["r1"]
    e.state = ReplicaState.READY  # type: ignore[misc]
    assert agent.ready_engine("a", "r1") is e
    agent.inflight.enter("r1")
    await agent.apply([])
    assert agent.ready_engine("a", "r1") is None and agent.ready_engine("a", None) is None  # no new request
    assert [(s.replica_id, s.state) for s in agent.statuses()] == [("r1", ReplicaState.STOPPING)]
    await asyncio.sleep(0.2)
    assert not e.stopped  # its request in flight is served to the end
    agent.inflight.leave("r1")
    await agent.draining.wait()
    assert e.stopped and agent.statuses() == []


async def test_the_hub_models_of_the_engines_assigned_are_had_before_they_launch(
    agent: WorkerAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager pushes assignments before its prefetch orders arrive: the agent hands the prefetcher its engines'
    hub models first, so a launch during a hub outage finds its model's check begun (worker/prefetch.py, judged)."""
    monkeypatch.setattr(agent.prefetcher, "_start", lambda: None)  # no download child: the wiring is what is checked
    hub = assignment("r1").model_copy(update={"model_name": "org/a"})
    try:
        await agent.apply([hub, assignment("r2")])
        assert [(s.model_name, s.state) for s in agent.prefetcher.statuses()] == [("org/a", CacheState.QUEUED)]
        await agent.apply([assignment("r2")])
        assert agent.prefetcher.statuses() == []
    finally:
        await agent.prefetcher.close()  # its hub watch


async def test_an_engine_on_a_draining_engines_gpu_starts_once_it_is_gone(agent: WorkerAgent) -> None:
    await agent.apply([assignment("old", [0])])
    agent.inflight.enter("old")
    await agent.apply([assignment("new", [0])])  # the manager placed it in the room of the one leaving
    assert "new" not in agent.engines  # not started: the old engine holds the GPU's memory
    agent.inflight.leave("old")
    await agent.draining.wait()
    await agent.apply([assignment("new", [0])])  # the next heartbeat reply (the drain's end sent one)
    assert "new" in agent.engines


async def test_an_engine_put_to_sleep_finishes_its_requests_first(agent: WorkerAgent) -> None:
    await agent.apply([assignment("r1")])
    e = agent.engines["r1"]
    e.state = ReplicaState.READY  # type: ignore[misc]
    agent.inflight.enter("r1")
    await agent.apply([assignment("r1", asleep=True)])
    await agent.apply([assignment("r1", asleep=True)])  # every heartbeat repeats it: one sleep all the same
    await asyncio.sleep(0.2)
    assert e.slept is None
    agent.inflight.leave("r1")
    await until(lambda: e.slept == 1)


async def test_a_sleep_no_longer_wanted_once_idle_does_not_happen(agent: WorkerAgent) -> None:
    await agent.apply([assignment("r1")])
    e = agent.engines["r1"]
    e.state = ReplicaState.READY  # type: ignore[misc]
    agent.inflight.enter("r1")
    await agent.apply([assignment("r1", asleep=True)])
    await agent.apply([assignment("r1", asleep=False)])  # a request came: woken before it slept
    agent.inflight.leave("r1")
    await asyncio.sleep(0.2)
    assert e.slept is None and e.state is ReplicaState.READY


def test_quiet_for_is_zero_while_a_request_is_in_flight_then_counts_from_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What lets a worker launch its fork server only when its engines are not serving (worker/agent.py)."""
    now = [100.0]
    monkeypatch.setattr("serverless_vllm.worker.drain.time.monotonic", lambda: now[0])
    inflight = InFlight()
    assert inflight.quiet_for() >= 100.0  # nothing ever served
    inflight.enter("r-1")
    now[0] = 150.0
    assert inflight.quiet_for() == 0.0
    inflight.leave("r-1")
    now[0] = 151.5
    assert inflight.quiet_for() == 1.5


def test_a_worker_launches_no_fork_server_while_its_engines_serve(tmp_path: Path) -> None:
    agent = WorkerAgent(WorkerSettings(worker_id="w", log_dir=str(tmp_path)))
    assert not agent.fork_server_must_wait()
    agent.inflight.enter("r-1")
    assert agent.fork_server_must_wait()
    agent.inflight.leave("r-1")
    assert agent.fork_server_must_wait()  # quiet for less than FORK_SERVER_QUIET_S yet
