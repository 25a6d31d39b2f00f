"""Fleet hygiene: a worker a router could not reach is dead only after refused probes in a row, and a dead worker
is forgotten after DEAD_WORKER_RETENTION (it registers again if it comes back)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from serverless_vllm.config import ManagerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import DemandReport, Endpoint, Heartbeat, ModelSpec, WorkerRegistration, WorkerState

from .fleet import NOWHERE, Clock


def settings(tmp_path: Path, **kw: float) -> ManagerSettings:
    return ManagerSettings(db_path=str(tmp_path / "m.db"), heartbeat_timeout_s=10, model_dirs=["/"], **kw)


async def report_refused(core: ManagerCore, worker_id: str, url: str) -> None:
    """What a router sends when it cannot connect to one of the worker's engines."""
    endpoint = Endpoint(replica_id="any", worker_id=worker_id, url=url)
    await core.report_demand(DemandReport(router_id="r1", failed_endpoints=[endpoint]))


async def placed_on(core: ManagerCore, worker_id: str) -> str:
    """Model `a` (one CPU replica, kept) placed on the worker: its replica id."""
    await core.register_model(ModelSpec(alias="a", model_name="org/a", min_replicas=1))
    await core.reconcile()
    [replica] = core.model_info("a").replicas
    assert replica.worker_id == worker_id
    return replica.replica_id


# --------------------------------------------------------------------------- probes


class CountingTransport(httpx.AsyncBaseTransport):
    """The real network underneath; records each /health attempt's outcome and wakes waiters on each."""

    def __init__(self) -> None:
        self._real = httpx.AsyncHTTPTransport()
        self.outcomes: list[str] = []
        self.attempted = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._real.handle_async_request(request)
        except httpx.ConnectError:
            if request.url.path == "/health":
                self.outcomes.append("refused")
                self.attempted.set()
            raise
        if request.url.path == "/health":
            self.outcomes.append(str(response.status_code))
            self.attempted.set()
        return response

    async def aclose(self) -> None:
        await self._real.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def answer_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}')
    await writer.drain()
    writer.close()


async def test_a_worker_refused_once_then_answering_stays_healthy_with_its_replicas(tmp_path: Path) -> None:
    """A real loopback port: nothing listens at the first probe (refused), a server does by the second."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    transport = CountingTransport()
    core = ManagerCore(
        settings(tmp_path, probe_attempts=3, probe_interval_s=0.3),
        clock=Clock(),
        client=httpx.AsyncClient(transport=transport),
        worker_headers={},
    )
    await core.start()
    server: asyncio.Server | None = None
    try:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=url, cpu_slots=1))
        await core.register_worker(WorkerRegistration(worker_id="w2", url=NOWHERE, cpu_slots=1))
        replica_id = await placed_on(core, "w1")
        await report_refused(core, "w1", url)
        await asyncio.wait_for(transport.attempted.wait(), 5)
        assert transport.outcomes == ["refused"]
        server = await asyncio.start_server(answer_health, "127.0.0.1", port)  # the worker is back
        await asyncio.wait_for(core.worker_link.wait_probes(), 10)
        assert transport.outcomes == ["refused", "200"]
        await core.reconcile()
        assert core.workers.get("w1").state is WorkerState.HEALTHY
        assert [r.replica_id for r in core.model_info("a").replicas] == [replica_id]
        assert core.stats.failovers == 0
    finally:
        if server is not None:
            server.close()
        await core.close()


class Refusing:
    """An in-memory network where the workers in `down` refuse connections; every other call is answered."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.health: list[tuple[str, float]] = []  # (worker, monotonic time) of each /health attempt
        self.on_health: Callable[[str, int], Awaitable[None]] | None = None  # (worker, its attempt number)
        self.hung: set[str] = set()  # workers that accept an assignment push and never answer it
        self.pushes: list[str] = []  # the worker of each push, in order

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        worker = request.url.host
        if request.method == "PUT" and request.url.path == "/engines":
            self.pushes.append(worker)
            if worker in self.hung:
                await asyncio.Event().wait()  # until the client gives up (its timeout) or the manager closes
        if request.url.path == "/health":
            self.health.append((worker, time.monotonic()))
            if self.on_health is not None:
                await self.on_health(worker, sum(w == worker for w, _ in self.health))
            if worker in self.down:
                raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"status": "ok"} if request.url.path == "/health" else [])


@pytest.fixture
async def network() -> Refusing:
    return Refusing()


@pytest.fixture
async def core(tmp_path: Path, network: Refusing) -> AsyncIterator[ManagerCore]:
    c = ManagerCore(
        settings(tmp_path, probe_attempts=3, probe_interval_s=0.05),
        clock=Clock(),
        client=httpx.AsyncClient(transport=httpx.MockTransport(network)),
        worker_headers={},
    )
    await c.start()
    await c.register_worker(WorkerRegistration(worker_id="w1", url="http://w1:7000", cpu_slots=1))
    await c.register_worker(WorkerRegistration(worker_id="w2", url="http://w2:7000", cpu_slots=1))
    yield c
    await c.close()


async def test_a_worker_refusing_every_probe_is_dead_and_its_replicas_move(
    core: ManagerCore, network: Refusing
) -> None:
    await placed_on(core, "w1")
    network.down.add("w1")
    await report_refused(core, "w1", "http://w1:7000")
    await report_refused(core, "w1", "http://w1:7000")  # a second router's report joins the probe under way
    await core.worker_link.wait_probes()
    times = [t for _, t in network.health]
    assert [w for w, _ in network.health] == ["w1"] * 3  # probe_attempts, not one and not six
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(times))  # probe_interval_s (0.05) apart
    assert core.workers.get("w1").state is WorkerState.DEAD
    await core.reconcile()
    assert [r.worker_id for r in core.model_info("a").replicas] == ["w2"]
    assert core.stats.failovers == 1


@pytest.mark.parametrize("beat_at", [1, 3])
async def test_a_heartbeat_during_the_probe_cancels_the_verdict(
    core: ManagerCore, network: Refusing, beat_at: int
) -> None:
    replica_id = await placed_on(core, "w1")
    network.down.add("w1")  # its engines' port refuses, yet the worker itself is alive and heartbeats

    async def beat(worker: str, attempt: int) -> None:
        if attempt == beat_at:  # while that probe is under way (the last one: just before the verdict)
            await core.heartbeat(Heartbeat(worker_id=worker))

    network.on_health = beat
    await report_refused(core, "w1", "http://w1:7000")
    await core.worker_link.wait_probes()
    assert len(network.health) == beat_at  # the heartbeat ended the probe
    assert core.workers.get("w1").state is WorkerState.HEALTHY
    await core.reconcile()
    assert [r.replica_id for r in core.model_info("a").replicas] == [replica_id]


# --------------------------------------------------------------------------- retention of dead workers


async def test_a_dead_worker_is_listed_until_the_retention_then_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    core = ManagerCore(settings(tmp_path, dead_worker_retention_s=600), clock=clock)
    await core.start()
    try:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
        await core.register_worker(WorkerRegistration(worker_id="w2", url=NOWHERE, cpu_slots=1))
        await placed_on(core, "w1")
        for _ in range(21):  # w1 silent for twice the timeout while the manager runs; w2 heartbeats
            clock.now += 1
            await core.heartbeat(Heartbeat(worker_id="w2"))
            await core.reconcile()
        dead_at = clock.now
        assert {w.worker_id: w.state for w in core.list_workers()} == {"w1": "dead", "w2": "healthy"}
        assert 'svllm_worker_state{worker="w1",state="dead"} 1.0' in (await core.metrics_text()).decode()

        clock.now = dead_at + 599
        await core.heartbeat(Heartbeat(worker_id="w2"))
        await core.reconcile()
        assert [w.worker_id for w in core.list_workers()] == ["w1", "w2"]

        clock.now = dead_at + 600
        await core.heartbeat(Heartbeat(worker_id="w2"))
        await core.reconcile()
        assert [w.worker_id for w in core.list_workers()] == ["w2"]
        assert core.health()["workers"] == {"healthy": 1, "unhealthy": 0, "draining": 0, "dead": 0}
        text = (await core.metrics_text()).decode()
        assert 'worker="w2"' in text and 'worker="w1"' not in text  # its series went with the record
        assert core.worker_link.cached_reply("w1") is None and core.worker_link.pushed("w1") is None
        assert [r.worker_id for r in core.model_info("a").replicas] == ["w2"]

        # It comes back: told to register again, and once registered it is a worker like any other.
        assert (await core.heartbeat(Heartbeat(worker_id="w1"))).reregister
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
        assert not (await core.heartbeat(Heartbeat(worker_id="w1"))).reregister
        assert {w.worker_id: w.state for w in core.list_workers()} == {"w1": "healthy", "w2": "healthy"}
    finally:
        await core.close()


async def test_a_worker_dead_by_probe_is_forgotten_too(core: ManagerCore, network: Refusing) -> None:
    clock = core.clock
    assert isinstance(clock, Clock)
    network.down.add("w1")
    await report_refused(core, "w1", "http://w1:7000")
    await core.worker_link.wait_probes()
    assert core.workers.get("w1").state is WorkerState.DEAD
    clock.now += core.settings.dead_worker_retention_s - 1
    await core.heartbeat(Heartbeat(worker_id="w2"))
    await core.reconcile()
    assert core.workers.get("w1") is not None
    clock.now += 1
    await core.heartbeat(Heartbeat(worker_id="w2"))
    await core.reconcile()
    assert core.workers.get("w1") is None and [w.worker_id for w in core.list_workers()] == ["w2"]


async def test_a_hung_worker_does_not_stall_the_pass_for_the_others(core: ManagerCore, network: Refusing) -> None:
    """A worker that accepts connections and never answers: its assignment push waits for it alone. The pass returns
    at once, the other worker gets its assignments, and the hung one gets no second push while the first waits."""
    network.hung.add("w1")
    await core.register_model(ModelSpec(alias="a", model_name="org/a", min_replicas=2, max_replicas=2))
    await asyncio.wait_for(core.reconcile(), 2)  # it awaited every push before: the worker timeout, here forever
    assert {r.worker_id for r in core.model_info("a").replicas} == {"w1", "w2"}
    for _ in range(100):
        if core.worker_link.pushed("w2") is not None:
            break
        await asyncio.sleep(0.01)
    assert core.worker_link.pushed("w2") == frozenset(core.worker_link.assignment_key("w2"))
    assert core.worker_link.pushed("w1") != frozenset(core.worker_link.assignment_key("w1"))  # not accepted (yet)
    await asyncio.wait_for(core.reconcile(), 2)
    assert sorted(network.pushes) == ["w1", "w2"]  # one push to the hung worker, still under way
