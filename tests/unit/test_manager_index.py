"""The manager's indexes and incremental work give the answers of the plain scans they replace.

ManagerCore keeps replicas indexed by model and by worker, rebuilds only the routes that changed, reuses a
worker's heartbeat reply until its assignments change, and keeps one capacity snapshot per reconcile pass.
Each test compares against a from-scratch computation written as the manager did before (every model against
every replica), over a seeded random sequence of registrations, heartbeats, deaths, deletions and passes.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import httpx
import pytest
from serverless_vllm.config import ManagerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.manager.http_app import create_app
from serverless_vllm.manager.placement import PlacementError, WorkerCapacity, place
from serverless_vllm.manager.replicas import ACTIVE, Replica
from serverless_vllm.schemas import (
    Assignment,
    DemandReport,
    EngineArgs,
    EngineStatus,
    Heartbeat,
    HeartbeatReply,
    ModelLoad,
    ModelPatch,
    ModelRoute,
    ModelSpec,
    ModelState,
    ReplicaState,
    WorkerRegistration,
    WorkerState,
)

from .fleet import Clock, gpu

# --------------------------------------------------------------------------- the plain scans, as they were


def reference_routes(core: ManagerCore) -> dict[str, ModelRoute]:
    """Every model's route from every replica (the O(models x replicas) rebuild the index replaced)."""
    now = core.clock()
    healthy = {w.worker_id: w for w in core.workers.healthy()}
    replicas = list(core.replicas.values())
    out: dict[str, ModelRoute] = {}
    for alias, model in core.registry.models.items():
        mine = [r for r in replicas if r.alias == alias and r.draining_since is None]
        endpoints = [
            {"replica_id": r.replica_id, "worker_id": r.worker_id, "url": healthy[r.worker_id].url}
            for r in mine
            if r.state is ReplicaState.READY and not r.asleep and r.worker_id in healthy
        ]
        error, ready_at = None, None
        if endpoints:
            state = ModelState.READY
        elif any(r.state in ACTIVE and not r.asleep for r in mine):
            state = ModelState.LOADING
            expected = [r.ready_at for r in mine if r.ready_at and not r.asleep and r.state is not ReplicaState.READY]
            ready_at = min(expected, default=None)
        elif any(r.asleep for r in mine):
            state = ModelState.SLEEPING
        elif core.registry.failed_recently(model, now):
            state, error = ModelState.FAILED, model.last_error
        else:
            state = ModelState.COLD
        out[alias] = ModelRoute(
            state=state, endpoints=endpoints, error=error, created=int(model.created_at), ready_at=ready_at
        )
    return out


def reference_assignments(core: ManagerCore, worker_id: str) -> list[Assignment]:
    out = []
    for r in core.replicas.values():
        model = core.registry.models.get(r.alias)
        if r.worker_id == worker_id and model is not None and r.draining_since is None:
            out.append(
                Assignment(
                    replica_id=r.replica_id,
                    alias=r.alias,
                    model_name=model.spec.model_name,
                    engine=model.spec.engine_args(),
                    gpus=r.gpus,
                    asleep=r.asleep,
                )
            )
    return out


def reference_capacities(core: ManagerCore) -> dict[str, WorkerCapacity]:
    capacities = {
        w.worker_id: WorkerCapacity(
            worker_id=w.worker_id,
            healthy=w.state is WorkerState.HEALTHY,
            gpu_indices=[g.index for g in w.gpus],
            engine_overhead_mb=core.settings.gpu_engine_overhead_mb,
            gpu_total_mb={g.index: g.memory_total_mb for g in w.gpus},
            # No engine reported here: whatever NVML says is used is outside our engines (manager/gpu_memory.py).
            gpu_foreign_mb={g.index: g.memory_total_mb - g.memory_free_mb for g in w.gpus if not w.engines},
            cpu_slots=w.registration.cpu_slots,
        )
        for w in core.workers.all()
        if w.state is not WorkerState.DEAD
    }
    for r in core.replicas.values():
        cap = capacities.get(r.worker_id)
        if cap is None:
            continue
        if r.gpus:
            for g in r.gpus:
                cap.gpu_claims[g] = cap.gpu_claims.get(g, 0.0) + r.fraction
                cap.gpu_engines[g] = cap.gpu_engines.get(g, 0) + 1
        else:
            cap.cpu_used += 1
        cap.aliases.add(r.alias)
    return capacities


def reference_place(alias: str, engine: EngineArgs, workers: list[WorkerCapacity]) -> tuple[str, list[int]] | str:
    """place() before its fast path: rank every candidate, stable sort, first wins."""
    need, fraction = engine.tensor_parallel_size, engine.gpu_memory_utilization
    candidates = []
    for w in workers:
        if not w.healthy:
            continue
        repeat = int(alias in w.aliases)
        if w.gpu_indices:
            fitting = [g for g in w.gpu_indices if w.free_fraction(g) + 1e-6 >= fraction]
            if len(fitting) < need:
                continue
            fitting.sort(key=lambda g: (w.free_fraction(g), g))
            load = sum(w.gpu_claims.values()) / len(w.gpu_indices)
            candidates.append(((0, repeat, load), (w.worker_id, sorted(fitting[:need]))))
        elif need <= 1 and w.cpu_used < w.cpu_slots:
            candidates.append(((1, repeat, w.cpu_used / max(1, w.cpu_slots)), (w.worker_id, [])))
    if not candidates:
        return "unplaceable"
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


def check_index(core: ManagerCore) -> None:
    replicas = list(core.replicas.values())
    assert len(core.replicas) == len(replicas)
    for key, index in (("alias", core.replicas.alias_groups), ("worker_id", core.replicas.worker_groups)):
        regrouped: dict[str, list[str]] = {}
        for r in replicas:
            regrouped.setdefault(getattr(r, key), []).append(r.replica_id)
        assert {k: list(group) for k, group in index.items()} == regrouped  # same members, same order


def check_all(core: ManagerCore) -> None:
    check_index(core)
    # No replica on a dead or forgotten worker, and nothing remembered for one (a push that completes after a
    # probe declared its worker dead included: the background loop pushes while probes run).
    live = {w.worker_id for w in core.workers.all() if w.state is not WorkerState.DEAD}
    assert {r.worker_id for r in core.replicas.values()} <= live
    link = core.worker_link
    for worker_id in link._pushed.keys() | link._replies.keys():
        assert worker_id in live, worker_id
    table = core.routing_table()
    expected = reference_routes(core)
    assert list(table.models) == list(expected)  # registration order
    assert table.models == expected
    for record in core.workers.all():
        assert core.worker_link.assignments(record.worker_id) == reference_assignments(core, record.worker_id)


# --------------------------------------------------------------------------- a random fleet's life


class Fleet:
    """Drives a ManagerCore with random operations; pushes land in an in-memory transport."""

    def __init__(self, core: ManagerCore, rng: random.Random, clock: Clock) -> None:
        self.core, self.rng, self.clock = core, rng, clock
        self.running: dict[str, dict[str, EngineStatus]] = {}  # worker -> what it reports
        self.pushed: dict[str, list[dict[str, object]]] = {}
        self.n_models = self.n_workers = 0
        self.down: set[str] = set()  # workers that refuse connections when probed

    def transport(self, request: httpx.Request) -> httpx.Response:
        worker_id = request.url.host
        if request.url.path == "/health":
            if worker_id in self.down:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, json={"status": "ok"})
        self.pushed[worker_id] = json.loads(request.content)
        return httpx.Response(200, json=[])

    async def register_model(self) -> None:
        rng = self.rng
        self.n_models += 1
        spec = ModelSpec(
            alias=f"m{self.n_models}",
            model_name=f"org/m{self.n_models % 5}",
            gpu_memory_utilization=rng.choice([0.2, 0.3, 0.5, 0.9]),
            tensor_parallel_size=rng.choice([1, 1, 1, 2]),
            min_replicas=rng.choice([0, 0, 1, 2]),
            max_replicas=3,
            idle_timeout_s=rng.choice([3.0, 30.0]),
            preload=rng.random() < 0.5,
        )
        await self.core.register_model(spec)

    async def delete_model(self) -> None:
        if self.core.registry.models:
            await self.core.delete_model(self.rng.choice(list(self.core.registry.models)))

    async def patch_model(self) -> None:
        if self.core.registry.models:
            n = self.rng.choice([0, 1, 2])
            await self.core.patch_model(
                self.rng.choice(list(self.core.registry.models)), ModelPatch(min_replicas=n, max_replicas=max(n, 1) + 1)
            )

    async def register_worker(self) -> None:
        rng = self.rng
        known = [w.worker_id for w in self.core.workers.all()]
        if known and rng.random() < 0.3:
            worker_id = rng.choice(known)  # a restart: same id, maybe another port, engines it still runs
        else:
            self.n_workers += 1
            worker_id = f"w{self.n_workers}"
        gpus = [gpu(i) for i in range(rng.choice([0, 1, 2, 4]))]
        reg = WorkerRegistration(
            worker_id=worker_id,
            url=f"http://{worker_id}:{rng.randint(7000, 7002)}",
            gpus=gpus,
            cpu_slots=0 if gpus else 2,
            sleep_supported=rng.random() < 0.5,
            engines=list(self.running.get(worker_id, {}).values()),
        )
        reply = await self.core.register_worker(reg)
        assert reply.assignments == reference_assignments(self.core, worker_id)

    async def heartbeat(self) -> None:
        workers = [w for w in self.core.workers.all() if w.state is not WorkerState.DEAD]
        if not workers:
            return
        worker_id = self.rng.choice(workers).worker_id
        engines = {}
        for a in reference_assignments(self.core, worker_id):
            roll = self.rng.random()
            if roll < 0.1:
                continue  # not (yet) running
            state = (
                ReplicaState.FAILED
                if roll < 0.15
                else ReplicaState.STARTING
                if roll < 0.3
                else ReplicaState.SLEEPING
                if a.asleep
                else ReplicaState.READY
            )
            engines[a.replica_id] = EngineStatus(
                replica_id=a.replica_id,
                alias=a.alias,
                state=state,
                gpus=a.gpus,
                model_name=a.model_name,
                error="boom" if state == "failed" else None,
            )
        self.running[worker_id] = engines
        reply = await self.core.heartbeat(Heartbeat(worker_id=worker_id, engines=list(engines.values())))
        assert reply.reregister or reply.assignments == reference_assignments(self.core, worker_id)

    async def demand(self) -> None:
        if self.core.registry.models:
            models = list(self.core.registry.models)
            aliases = self.rng.sample(models, k=min(2, len(models)))
            await self.core.report_demand(
                DemandReport(
                    router_id="r1",
                    models={a: ModelLoad(in_flight=self.rng.choice([0, 5, 20])) for a in aliases},
                    wake=aliases[:1],
                )
            )

    async def endpoint_refused(self) -> None:
        # A router could not connect to a worker's engine: the manager probes it and, refused, declares it dead.
        table = self.core.routing_table()
        endpoints = [e for route in table.models.values() for e in route.endpoints]
        if endpoints:
            endpoint = self.rng.choice(endpoints)
            self.down.add(endpoint.worker_id)
            await self.core.report_demand(DemandReport(router_id="r1", failed_endpoints=[endpoint]))
            await self.core.worker_link.wait_probes()
            self.down.discard(endpoint.worker_id)

    async def time_passes(self) -> None:
        # Some workers go silent (unhealthy, then dead), the others beat; then a pass.
        self.clock.now += self.rng.choice([1.0, 3.0, 6.0])
        await self.core.reconcile()

    async def step(self) -> None:
        op = self.rng.choices(
            [
                self.register_model,
                self.delete_model,
                self.patch_model,
                self.register_worker,
                self.heartbeat,
                self.demand,
                self.core.reconcile,
                self.time_passes,
                self.endpoint_refused,
            ],
            weights=[3, 1, 1, 2, 8, 1, 3, 2, 1],
        )[0]
        await op()


@pytest.mark.parametrize("seed", range(10))
async def test_incremental_state_matches_a_full_recomputation(tmp_path: Path, seed: int) -> None:
    clock = Clock()
    rng = random.Random(seed)
    fleet: Fleet | None = None

    def handler(request: httpx.Request) -> httpx.Response:
        assert fleet is not None
        return fleet.transport(request)

    core = ManagerCore(
        ManagerSettings(
            db_path=str(tmp_path / "m.db"),
            heartbeat_timeout_s=10,
            failed_retry_after_s=5,
            scale_down_delay_s=2,
            probe_interval_s=0,  # a refused worker is refused probe_attempts times at once
            dead_worker_retention_s=15,  # dead workers are forgotten during the run too
            model_dirs=["/"],
        ),
        clock=clock,
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        worker_headers={},
    )
    fleet = Fleet(core, rng, clock)
    await core.start()
    try:
        versions = [core.routing_table()]
        core.routing.listen(versions.append)  # every new table version, as the routers would be told of it
        placed = 0  # the most replicas the run had at once
        for _ in range(400):
            await fleet.step()
            check_all(core)
            placed = max(placed, len(core.replicas))
        for previous, table in itertools.pairwise(versions):
            assert table.version == previous.version + 1
            assert table.models != previous.models  # a new version means a real change
        # What each worker last accepted (by push or in a heartbeat reply) is what it is assigned.
        # Pushes run in the background of a pass, one per worker at a time: a change made while one was under way
        # goes in the next pass's.
        for _ in range(2):
            await core.reconcile()
            await core.worker_link.wait_pushes()
        for record in core.workers.all():
            if record.state is not WorkerState.DEAD:
                key = core.worker_link.pushed(record.worker_id)
                assert key == frozenset(core.worker_link.assignment_key(record.worker_id))
        # The run did exercise something. (Not the replicas at its end: a run whose background pushes interleave
        # with its steps differently on a loaded machine may end with every model deleted or every worker dead.)
        assert len(versions) > 10 and placed > 0
    finally:
        await core.close()


async def test_a_restarted_manager_builds_the_same_table(tmp_path: Path) -> None:
    settings = ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"])
    first = ManagerCore(settings)
    for i in range(5):
        await first.register_model(ModelSpec(alias=f"m{i}", model_name="org/m", preload=False))
    await first.delete_model("m2")
    await first.register_model(ModelSpec(alias="m2", model_name="org/other", preload=False))
    await first.close()
    second = ManagerCore(settings)
    assert list(second.routing_table().models) == ["m0", "m1", "m3", "m4", "m2"]
    assert second.routing_table().models == reference_routes(second)
    await second.close()


# --------------------------------------------------------------------------- capacity snapshot and placement


async def test_pass_snapshot_follows_adds_and_removes_exactly(tmp_path: Path) -> None:
    rng = random.Random(7)
    core = ManagerCore(ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"]), clock=Clock())
    for i in range(4):
        await core.register_worker(
            WorkerRegistration(
                worker_id=f"w{i}",
                url=f"http://w{i}",
                cpu_slots=0 if i else 3,
                gpus=[gpu(g) for g in range(2 if i else 0)],
            )
        )
    reconciler = core.reconciler
    with reconciler.pass_snapshot():
        reconciler.capacities()  # the pass's snapshot, kept in step from here on
        ids: list[str] = []
        for n in range(200):
            if ids and rng.random() < 0.4:
                reconciler.remove_replica(ids.pop(rng.randrange(len(ids))))
            else:
                worker = f"w{rng.randrange(4)}"
                gpus = [] if worker == "w0" else rng.sample([0, 1], k=rng.choice([1, 2]))
                replica = Replica(
                    replica_id=f"r{n}",
                    alias=f"m{rng.randrange(5)}",
                    worker_id=worker,
                    gpus=gpus,
                    fraction=rng.choice([0.1, 0.2, 0.3]) if gpus else 0.0,
                )
                reconciler.add_replica(replica)
                ids.append(replica.replica_id)
            # Floats equal to the last bit, aliases included.
            assert reconciler.snapshot == reference_capacities(core)
    assert reconciler.snapshot is None
    await core.close()


@pytest.mark.parametrize("seed", range(20))
def test_place_fast_path_picks_what_the_full_ranking_picks(seed: int) -> None:
    rng = random.Random(seed)
    workers = []
    for i in range(rng.randint(1, 30)):
        if rng.random() < 0.2:
            workers.append(
                WorkerCapacity(
                    worker_id=f"c{i}",
                    healthy=rng.random() < 0.9,
                    gpu_indices=[],
                    cpu_slots=rng.randint(0, 3),
                    cpu_used=rng.randint(0, 3),
                    aliases={"m"} if rng.random() < 0.3 else set(),
                )
            )
        else:
            n = rng.choice([1, 2, 4, 8])
            claims = {g: rng.choice([0.0, 0.1, 0.3, 0.3, 0.6, 0.9]) for g in range(n) if rng.random() < 0.7}
            workers.append(
                WorkerCapacity(
                    worker_id=f"g{i}",
                    healthy=rng.random() < 0.9,
                    gpu_indices=list(range(n)),
                    gpu_claims=claims,
                    aliases={"m"} if rng.random() < 0.3 else set(),
                )
            )
    for _ in range(10):
        engine = EngineArgs(
            gpu_memory_utilization=rng.choice([0.1, 0.3, 0.5, 0.95]), tensor_parallel_size=rng.choice([1, 1, 2, 4])
        )
        expected = reference_place("m", engine, workers)
        try:
            p = place("m", engine, workers)
            assert (p.worker_id, p.gpus) == expected
        except PlacementError as err:
            assert expected == "unplaceable"
            assert len(err.rejections) == len(workers)  # every worker's reason is still given


# --------------------------------------------------------------------------- heartbeat replies


async def test_heartbeat_reply_is_reused_until_assignments_change(tmp_path: Path) -> None:
    clock = Clock()
    core = ManagerCore(
        ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"]),
        clock=clock,
        client=httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))),
        worker_headers={},
    )
    app = create_app(core.settings, core=core)
    await core.start()
    await core.register_worker(WorkerRegistration(worker_id="g1", url="http://g1", gpus=[gpu(0)], sleep_supported=True))
    await core.register_model(ModelSpec(alias="a", model_name="org/a", gpu_memory_utilization=0.5, idle_timeout_s=5))
    await core.reconcile()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as http:

        async def beat(engines: list[EngineStatus]) -> tuple[HeartbeatReply, dict[str, object]]:
            hb = Heartbeat(worker_id="g1", engines=engines)
            resp = await http.post("/workers/heartbeat", json=hb.model_dump(mode="json"))
            assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
            reply = core.worker_link.cached_reply("g1")
            assert reply is not None
            return reply, resp.json()

        first, body = await beat([])
        assert body == first.model_dump(mode="json") and len(first.assignments) == 1
        a = first.assignments[0]
        ready = EngineStatus(replica_id=a.replica_id, alias="a", state=ReplicaState.READY, gpus=a.gpus)
        again, body2 = await beat([ready])
        assert again is first and body2 == body  # nothing changed: the same reply, the same bytes
        for _ in range(6):  # idle past its timeout: put to sleep, so the assignment changes
            clock.now += 1
            await core.heartbeat(Heartbeat(worker_id="g1", engines=[ready]))
            await core.reconcile()
        asleep, body3 = await beat([ready])
        assert asleep is not first and asleep.assignments[0].asleep and body3 == asleep.model_dump(mode="json")
        unknown = await http.post("/workers/heartbeat", json={"worker_id": "ghost"})
        assert unknown.json() == {"reregister": True, "assignments": []}
    await core.close()


async def test_routing_json_is_the_current_table(tmp_path: Path) -> None:
    core = ManagerCore(ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"]), clock=Clock())
    app = create_app(core.settings, core=core)
    await core.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as http:
        await core.register_model(ModelSpec(alias="a", model_name="org/a", preload=False))
        first = (await http.get("/routing")).json()
        assert first == core.routing_table().model_dump(mode="json") and first["models"]["a"]["state"] == "cold"
        assert (await http.get("/routing")).json() == first
        await core.register_model(ModelSpec(alias="b", model_name="org/b", preload=False))
        second = (await http.get("/routing", params={"after": first["version"], "epoch": core.epoch})).json()
        assert second["version"] == first["version"] + 1 and list(second["models"]) == ["a", "b"]
    await core.close()
