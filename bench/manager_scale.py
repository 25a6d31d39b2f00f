"""Manager scale by simulation (issue 8.5): many workers heartbeating every second, many registered models.

Part 1 (a real `svllm manager` process): the registry is written to SQLite before the manager starts (M models:
A of them with min_replicas 1, placed at once, the rest cold with preload false), then bench/sim_workers.py
registers W simulated 8-GPU workers and heartbeats each of them every second, reporting the replicas they were
assigned as ready. Measured over a steady window: heartbeat latency (p50/p99, client side), the achieved
heartbeat rate against the offered one, the manager's CPU (busy fraction of one core) and memory (RSS), and
how many workers the manager still sees as healthy. Steps grow W and M to show where it breaks. The manager
retries a failed placement after FAILED_RETRY_S (not the default 30 s): its first pass runs when the first
worker registers, when most of the A models do not fit yet; without the retry they would stay unplaced (failed)
through the window and the heartbeats would carry almost no replicas.

Part 2 (ManagerCore in this process, same fleet shape): the time of one placement decision (`place`), of the
capacity snapshot it works on, of a heartbeat in the core (no HTTP), of a routing-table rebuild, and of a full
reconcile pass; pushes go to an in-memory transport.

    .venv/bin/python bench/manager_scale.py --quick
    .venv/bin/python bench/manager_scale.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SVLLM,
    LoopGaps,
    Procs,
    auth_env,
    base_env,
    free_port,
    http_ok,
    log,
    proc_cpu_seconds,
    proc_rss_mb,
    result_header,
    summary,
    wait_for_quiet,
    wait_until,
    write_result,
)


def make_registry(db: Path, models: int, active: int) -> None:
    """M registrations as the manager stores them; the first `active` keep one replica (min_replicas 1)."""
    import sqlite3

    from serverless_vllm.manager.store import ModelStore
    from serverless_vllm.schemas import ModelSpec

    ModelStore(str(db)).close()  # the schema, as the manager creates it
    rows = []
    now = time.time()
    for i in range(models):
        spec = ModelSpec(
            alias=f"model-{i:05d}",
            model_name=f"org/model-{i % 97}",
            max_model_len=8192,
            gpu_memory_utilization=0.3,
            min_replicas=1 if i < active else 0,
            max_replicas=2,
            idle_timeout_s=3600,
            preload=i < active,
        )
        rows.append((spec.alias, spec.model_dump_json(), now + i * 1e-6))
    db_conn = sqlite3.connect(str(db))
    with db_conn:
        db_conn.executemany("INSERT INTO models (alias, spec, created_at) VALUES (?, ?, ?)", rows)
    db_conn.close()


# --------------------------------------------------------------------------- part 1


# How soon the manager retries a model whose placement failed (see the module docstring).
FAILED_RETRY_S = 2.0


def step(
    procs: Procs,
    env: dict[str, str],
    token: str,
    workers: int,
    models: int,
    active: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    tag = f"w{workers}-m{models}"
    db = procs.tmp / f"{tag}.db"
    make_registry(db, models, active)
    port = free_port()
    t0 = time.monotonic()
    manager = procs.start(
        f"manager-{tag}",
        [SVLLM, "manager", "--host", "127.0.0.1", "--port", str(port)],
        {**env, "MANAGER_DB": str(db), "HEARTBEAT_TIMEOUT": "10", "FAILED_RETRY_AFTER": str(FAILED_RETRY_S)},
    )
    wait_until(lambda: manager.check() or http_ok(f"http://127.0.0.1:{port}/health"), 300, what="manager")
    startup_s = time.monotonic() - t0
    rss_idle = proc_rss_mb(manager.pid)
    out_path = procs.tmp / f"sim-{tag}.json"
    sim = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("sim_workers.py")),
            "--port",
            str(port),
            "--token",
            token,
            "--workers",
            str(workers),
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
            "--out",
            str(out_path),
        ],
        stdout=subprocess.PIPE,
        stderr=open(procs.tmp / f"sim-{tag}.log", "wb"),
        text=True,
    )
    cpu0 = cpu_sim0 = t_start = 0.0
    window: dict[str, Any] = {}
    try:
        assert sim.stdout is not None
        for line in sim.stdout:
            if line.startswith("WINDOW_START"):
                t_start, cpu0, cpu_sim0 = time.monotonic(), proc_cpu_seconds(manager.pid), proc_cpu_seconds(sim.pid)
            elif line.startswith("WINDOW_END"):
                wall = time.monotonic() - t_start
                window = {
                    "manager_cpu_busy": round((proc_cpu_seconds(manager.pid) - cpu0) / wall, 3),
                    "simulator_cpu_busy": round((proc_cpu_seconds(sim.pid) - cpu_sim0) / wall, 3),
                    "manager_rss_mb": round(proc_rss_mb(manager.pid), 1),
                }
                try:
                    import httpx

                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
                    window["workers_by_state"] = health.get("workers")
                    window["replicas"] = health.get("replicas")
                except Exception as exc:
                    window["health_error"] = repr(exc)
        sim.wait(300)
    finally:
        if sim.poll() is None:
            sim.kill()
        manager.stop()
    if sim.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"simulator failed: {(procs.tmp / f'sim-{tag}.log').read_text()[-2000:]}")
    res = json.loads(out_path.read_text())
    return {
        "workers": workers,
        "models": models,
        "active_models": active,
        "manager_startup_s": round(startup_s, 2),
        "manager_rss_mb_before_workers": round(rss_idle, 1),
        **window,
        "heartbeats": res,
    }


# --------------------------------------------------------------------------- part 2


def in_process(workers: int, models: int, active: int, repeat: int) -> dict[str, Any]:
    import httpx
    from serverless_vllm.config import ManagerSettings
    from serverless_vllm.dataplane.heap import freeze_startup_heap
    from serverless_vllm.manager.core import ManagerCore
    from serverless_vllm.manager.placement import place
    from serverless_vllm.schemas import EngineStatus, GPUInfo, Heartbeat, ModelSpec, ReplicaState, WorkerRegistration

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"svb-scale-core-{os.getpid()}.db"
    tmp.unlink(missing_ok=True)
    make_registry(tmp, models, active)

    def timeit(fn: Any, n: int, budget_s: float = 5.0) -> dict[str, Any]:
        """Up to n calls, stopping early once `budget_s` is spent (at least 3)."""
        times: list[float] = []
        while len(times) < n and (len(times) < 3 or sum(times) < budget_s):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return summary(times, 1000.0, 3)

    async def run() -> dict[str, Any]:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[]))
        client = httpx.AsyncClient(transport=transport)
        core = ManagerCore(
            ManagerSettings(db_path=str(tmp), heartbeat_timeout_s=3600), client=client, worker_headers={}
        )
        await core.start()
        freeze_startup_heap()  # as the manager service does once it has loaded the registry
        gpus = [
            GPUInfo(index=g, name="H100", uuid=f"u{g}", memory_total_mb=81559, memory_free_mb=80000) for g in range(8)
        ]
        # The fleet is put in place directly (registering 1,000 workers through the API would rebuild the
        # table each time: that cost is what part 1 measures).
        now = core.clock()
        for i in range(workers):
            core.workers.register(
                WorkerRegistration(worker_id=f"sim-{i:05d}", url=f"http://sim/{i}", gpus=gpus, sleep_supported=True),
                now,
            )
        t0 = time.perf_counter()
        await core.reconcile()  # places the active models
        first_pass_ms = (time.perf_counter() - t0) * 1000
        # Workers report their replicas ready.
        by_worker: dict[str, list[EngineStatus]] = {}
        for r in core.replicas.values():
            r.state = ReplicaState.READY
            by_worker.setdefault(r.worker_id, []).append(
                EngineStatus(replica_id=r.replica_id, alias=r.alias, state=ReplicaState.READY, gpus=r.gpus)
            )
        beats = {
            f"sim-{i:05d}": Heartbeat(worker_id=f"sim-{i:05d}", gpus=gpus, engines=by_worker.get(f"sim-{i:05d}", []))
            for i in range(workers)
        }
        for _wid, hb in beats.items():
            core.workers.heartbeat(hb, core.clock())
        core.routing.rebuild()
        await core.reconcile()
        out: dict[str, Any] = {
            "workers": workers,
            "models": models,
            "replicas": len(core.replicas),
            "first_reconcile_with_placements_ms": round(first_pass_ms, 1),
        }
        engine = ModelSpec(alias="x", model_name="org/x", gpu_memory_utilization=0.3).engine_args()
        capacities = core.reconciler.capacities()
        out["capacity_snapshot_ms"] = timeit(core.reconciler.capacities, repeat)
        out["place_ms"] = timeit(lambda: place("new-model", engine, capacities), repeat)
        out["rebuild_table_ms"] = timeit(core.routing.rebuild, repeat)
        # A Prometheus scrape of the manager, and how long the event loop that takes the heartbeats stalls
        # meanwhile: the largest gap a 1 ms ticker on that loop sees during the scrapes.
        async with LoopGaps() as loop:
            times = []
            for _ in range(min(repeat, 10)):
                t = time.perf_counter()
                await core.metrics_text()
                times.append(time.perf_counter() - t)
        out["metrics_scrape_ms"] = summary(times, 1000.0, 3)
        out["loop_gap_during_scrapes_ms"] = summary(loop.gaps, 1000.0, 3)
        hb = next(b for b in beats.values() if b.engines)
        times = []
        while len(times) < repeat and (len(times) < 3 or sum(times) < 5.0):
            t = time.perf_counter()
            await core.heartbeat(hb)
            times.append(time.perf_counter() - t)
        out["heartbeat_in_core_ms"] = summary(times, 1000.0, 3)
        # A heartbeat that changes one replica's state (ready <-> starting): that model's route is rebuilt.
        flip = [
            hb,
            hb.model_copy(
                update={"engines": [e.model_copy(update={"state": ReplicaState.STARTING}) for e in hb.engines]}
            ),
        ]
        times = []
        while len(times) < repeat and (len(times) < 3 or sum(times) < 5.0):
            t = time.perf_counter()
            await core.heartbeat(flip[len(times) % 2])
            times.append(time.perf_counter() - t)
        await core.heartbeat(hb)
        out["heartbeat_in_core_with_state_change_ms"] = summary(times, 1000.0, 3)
        # What-if: the same heartbeat when the routing table is not rebuilt (it changes nothing here).
        # (The components call the publisher's rebuild through its instance, so this replaces it for all.)
        rebuild = core.routing.rebuild
        core.routing.rebuild = lambda *_: None  # type: ignore[method-assign]
        times = []
        while len(times) < repeat and (len(times) < 3 or sum(times) < 5.0):
            t = time.perf_counter()
            await core.heartbeat(hb)
            times.append(time.perf_counter() - t)
        out["heartbeat_in_core_without_table_rebuild_ms"] = summary(times, 1000.0, 3)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            await core.reconcile()
            times.append(time.perf_counter() - t)
        out["reconcile_pass_without_table_rebuild_ms"] = summary(times, 1000.0, 1)
        core.routing.rebuild = rebuild  # type: ignore[method-assign]
        times = []
        for _ in range(3):
            t = time.perf_counter()
            await core.reconcile()
            times.append(time.perf_counter() - t)
        out["reconcile_pass_ms"] = summary(times, 1000.0, 1)
        # A cold start's decision: one model goes from 0 to 1 replica (scale, place, push, table).
        cold = [a for a, m in core.registry.models.items() if m.scale.target == 0][:3]
        for i in range(len(cold), 3):  # every model active (--quick): register cold ones to measure
            spec = ModelSpec(alias=f"cold-{i}", model_name="org/cold", gpu_memory_utilization=0.3, preload=False)
            cold.append((await core.register_model(spec)).alias)
        times = []
        for alias in cold:
            core.demand.wake([alias])  # as a router's report would, without kicking the loop
            t = time.perf_counter()
            await core.reconcile()
            times.append(time.perf_counter() - t)
        out["reconcile_with_one_cold_start_ms"] = summary(times, 1000.0, 1)
        await core.close()
        return out

    try:
        return asyncio.run(run())
    finally:
        tmp.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", help="workers:models pairs, e.g. 100:1000,1000:10000")
    p.add_argument("--active", type=int, default=1000, help="models with a running replica (capped at models)")
    p.add_argument("--duration", type=float, help="measured seconds per step (default 20, quick 5)")
    p.add_argument("--warmup", type=float, help="seconds of heartbeats before the window (default 8, quick 3)")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--out", help="results name (default manager_scale or manager_scale_quick)")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, quick 0)")
    a = p.parse_args()
    default_steps = (
        "50:500" if a.quick else "100:1000,300:1000,1000:1000,100:10000,300:10000,1000:10000,2000:10000,3000:10000"
    )
    steps = [tuple(int(x) for x in s.split(":")) for s in (a.steps or default_steps).split(",")]
    duration = a.duration or (5.0 if a.quick else 20.0)
    warmup = a.warmup or (3.0 if a.quick else 8.0)
    name = a.out or ("manager_scale_quick" if a.quick else "manager_scale")

    procs = Procs("scale")
    auth, _ = auth_env()
    env = {**base_env(procs.tmp), **auth}
    result: dict[str, Any] = {
        **result_header("manager_scale"),
        "settings": {
            "steps": steps,
            "active": a.active,
            "duration_s": duration,
            "warmup_s": warmup,
            "heartbeat_interval_s": 1.0,
            "gpus_per_worker": 8,
            "gpu_memory_utilization": 0.3,
            "failed_retry_after_s": FAILED_RETRY_S,
        },
    }
    try:
        result["quiet"] = wait_for_quiet(
            a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400), own_marker=str(procs.tmp)
        )
        biggest = max(steps, key=lambda s: (s[0], s[1]))
        log(f"in-process timings with {biggest[0]} workers, {biggest[1]} models")
        result["core"] = in_process(biggest[0], biggest[1], min(a.active, biggest[1]), 20 if a.quick else 100)
        log(f"  {json.dumps({k: v for k, v in result['core'].items()})}")
        result["steps"] = []
        for workers, models in [] if a.skip_sim else steps:
            log(f"step: {workers} workers, {models} models")
            res = step(procs, env, auth["SVLLM_WORKER_TOKEN"], workers, models, min(a.active, models), warmup, duration)
            hb = res["heartbeats"]
            log(
                f"  heartbeats {hb['achieved_rate_per_s']}/{hb['offered_rate_per_s']} per s, p50 "
                f"{hb['latency_ms']['p50']} ms, p99 {hb['latency_ms']['p99']} ms, manager CPU "
                f"{res.get('manager_cpu_busy')}, RSS {res.get('manager_rss_mb')} MB, workers {res.get('workers_by_state')}"
            )
            result["steps"].append(res)
    finally:
        result["loadavg_end"] = list(os.getloadavg())
        procs.stop_all()
    write_result(name, result)


if __name__ == "__main__":
    main()
