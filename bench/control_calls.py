"""Router -> manager control calls over HTTP and over Ray (issue 8.4), and proof that a ready model's requests
make none.

Part 1 times the calls a router actually makes, with the router's own client classes (HTTPManagerClient against
a real `svllm manager` process; RayManagerClient against the manager actor in a private Ray cluster, called from
a driver process as the Serve replica calls it): `wait_routing` with no change pending (timeout 0: the table
comes back at once), `report_demand` and `get_model`. Both managers load the same registry (N models, SQLite),
so the routing table returned by `wait_routing` has the same size. Calls are sequential; the two transports are
measured in alternating blocks.

Part 2 runs the router in this process with its ManagerAPI client wrapped to count calls, in front of a real
worker and engine, and sends a burst of inference with `hey` (a separate process): the counts during the burst
are the manager calls the requests caused.

    .venv/bin/python bench/control_calls.py --quick
    .venv/bin/python bench/control_calls.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SVLLM,
    CPUMeter,
    Procs,
    RayCluster,
    auth_env,
    base_env,
    free_port,
    http_ok,
    log,
    ratio,
    result_header,
    summary,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)

NAMESPACE = "svllm-bench-control"


def make_registry(db: Path, models: int) -> None:
    """N registered models (preload false: cold, nothing to place), written as the manager writes them."""
    from serverless_vllm.manager.store import ModelStore
    from serverless_vllm.schemas import ModelSpec

    store = ModelStore(str(db))
    for i in range(models):
        store.save(
            ModelSpec(
                alias=f"model-{i:05d}",
                model_name=f"org/model-{i % 50}",
                max_model_len=4096,
                gpu_memory_utilization=0.3,
                preload=False,
            )
        )
    store.close()


async def time_calls(client: Any, calls: int, alias: str) -> dict[str, Any]:
    """p50/p99 of each call the router makes, in microseconds."""
    from serverless_vllm.schemas import DemandReport, ModelLoad

    table = await client.wait_routing(-1, "", 0.0)
    report = DemandReport(router_id="bench-router", models={alias: ModelLoad(in_flight=3, queued=0, requests=40)})
    ops = {
        "wait_routing": lambda: client.wait_routing(table.version, table.epoch, 0.0),
        "report_demand": lambda: client.report_demand(report),
        "get_model": lambda: client.get_model(alias),
        "health": lambda: client.health(),  # reference: the smallest call of each transport
    }
    out: dict[str, Any] = {"table_models": len(table.models)}
    for name, op in ops.items():
        for _ in range(max(5, calls // 20)):  # warm-up
            await op()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await op()
            times.append(time.perf_counter() - t0)
        out[name] = summary(times, 1e6, 1)  # microseconds
    return out


# --------------------------------------------------------------------------- part 1


def part1(
    procs: Procs, env: dict[str, str], admin: dict[str, str], models: int, calls: int, blocks: int
) -> dict[str, Any]:
    import ray
    from serverless_vllm.config import AuthSettings, ManagerSettings
    from serverless_vllm.manager.http_client import HTTPManagerClient
    from serverless_vllm.ray_mode.actor import get_or_create_manager
    from serverless_vllm.ray_mode.client import RayManagerClient

    db = procs.tmp / f"registry-{models}.db"
    make_registry(db, models)
    shutil.copy(db, procs.tmp / f"registry-{models}-ray.db")
    mport = free_port()
    manager = procs.start(
        f"manager-{models}",
        [SVLLM, "manager", "--host", "127.0.0.1", "--port", str(mport)],
        {**env, "MANAGER_DB": str(db)},
    )
    wait_until(lambda: manager.check() or http_ok(f"http://127.0.0.1:{mport}/health"), 120, what="manager")

    settings = ManagerSettings(db_path=str(procs.tmp / f"registry-{models}-ray.db"), heartbeat_timeout_s=30)
    auth = AuthSettings.from_env(**{"mode": "on"})
    name = f"manager-{models}"
    actor = get_or_create_manager(settings, auth, name, NAMESPACE, pin_to_head=True)
    ray.get(actor.health.remote(), timeout=120)

    async def run() -> dict[str, Any]:
        http = HTTPManagerClient(f"http://127.0.0.1:{mport}", headers=admin)
        rayc = RayManagerClient(name, NAMESPACE)
        per: dict[str, list[dict[str, Any]]] = {"http": [], "ray": []}
        try:
            for b in range(blocks):
                order = [("http", http), ("ray", rayc)] if b % 2 == 0 else [("ray", rayc), ("http", http)]
                for label, client in order:
                    per[label].append(await time_calls(client, calls, "model-00000"))
        finally:
            await http.close()
        return per

    per = asyncio.run(run())
    ray.kill(actor, no_restart=True)
    manager.stop()
    out: dict[str, Any] = {"models": models, "calls_per_block": calls, "blocks": blocks, "blocks_raw": per}
    for label in ("http", "ray"):
        out[label] = {
            op: {k: _median([blk[op][k] for blk in per[label]]) for k in ("p50", "p99")}
            for op in ("wait_routing", "report_demand", "get_model", "health")
        }
    out["http_over_ray_p50"] = {
        op: ratio(out["http"][op]["p50"], out["ray"][op]["p50"], 2)
        for op in ("wait_routing", "report_demand", "get_model", "health")
    }
    return out


def _median(values: list[float]) -> float:
    return (
        sorted(values)[len(values) // 2]
        if len(values) % 2
        else sum(sorted(values)[len(values) // 2 - 1 : len(values) // 2 + 1]) / 2
    )


# --------------------------------------------------------------------------- part 2


class CountingManager:
    """A ManagerAPI that counts every call it passes on (by method name)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target) or name == "close":
            return target

        async def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.counts[name] += 1
            return await target(*args, **kwargs)

        return counted

    async def close(self) -> None:
        await self._inner.close()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def part2(
    procs: Procs, env: dict[str, str], admin: dict[str, str], client_key: str, burst_s: float, concurrency: int
) -> dict[str, Any]:
    import uvicorn
    from serverless_vllm.config import AuthSettings, RouterSettings
    from serverless_vllm.manager.http_client import HTTPManagerClient
    from serverless_vllm.router.app import create_router_app

    model = tiny_model(procs.tmp)
    mport, rport, wport = free_port(), free_port(), free_port()
    manager = procs.start("manager", [SVLLM, "manager", "--host", "127.0.0.1", "--port", str(mport)], env)
    wait_until(lambda: manager.check() or http_ok(f"http://127.0.0.1:{mport}/health"), 60, what="manager")
    worker = procs.start(
        "worker",
        [
            SVLLM,
            "worker",
            "--worker-id",
            "bench-w1",
            "--host",
            "127.0.0.1",
            "--port",
            str(wport),
            "--manager-url",
            f"http://127.0.0.1:{mport}",
        ],
        {**env, "CPU_SLOTS": "1"},
    )
    wait_until(lambda: worker.check() or http_ok(f"http://127.0.0.1:{wport}/health"), 60, what="worker")

    # The router, in this process, with the real app and a counting ManagerAPI client.
    for k, v in env.items():
        os.environ.setdefault(k, v)
    auth = AuthSettings.from_env()
    counting: dict[str, CountingManager] = {}

    def factory() -> CountingManager:
        counting["m"] = CountingManager(HTTPManagerClient(f"http://127.0.0.1:{mport}", headers=auth.admin_headers()))
        return counting["m"]

    settings = RouterSettings(
        host="127.0.0.1", port=rport, manager_url=f"http://127.0.0.1:{mport}", router_id="bench-counting-router"
    )
    app = create_router_app(settings, factory, auth=auth)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=rport, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="router", daemon=True)
    thread.start()
    procs.cleanups.append(lambda: (setattr(server, "should_exit", True), thread.join(15)))
    url = f"http://127.0.0.1:{rport}"
    wait_until(lambda: http_ok(f"{url}/health"), 60, what="in-process router")

    spec = {
        "alias": "tiny",
        "model_name": str(model),
        "max_model_len": 512,
        "min_replicas": 1,
        "max_replicas": 1,
        "idle_timeout_s": 3600,
        "preload": True,
    }
    httpx.post(f"{url}/v1/models/register", json=spec, headers=admin, timeout=60).raise_for_status()
    log("waiting for the engine to start")
    wait_until(
        lambda: httpx.get(f"{url}/v1/models/tiny", headers=admin, timeout=10).json()["state"] == "ready",
        900,
        interval=1,
        what="engine ready",
    )
    body = procs.tmp / "body.json"
    body.write_text(
        json.dumps(
            {
                "model": "tiny",
                "prompt": "Hello there, how are you?",
                "max_tokens": 4,
                "temperature": 0,
                "ignore_eos": True,
            }
        )
    )
    hey = [
        "hey",
        "-c",
        str(concurrency),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body),
        "-o",
        "csv",
        "-H",
        f"authorization: Bearer {client_key}",
        f"{url}/v1/completions",
    ]
    subprocess.run([*hey[:1], "-n", "20", *hey[1:]], capture_output=True, timeout=120)  # warm-up
    time.sleep(2.5)  # let the demand report of the warm-up go out
    meter = CPUMeter({"manager": lambda: [manager.pid]})
    before = counting["m"].snapshot()
    meter.start()
    t0 = time.monotonic()
    out = subprocess.run([*hey[:1], "-z", f"{burst_s}s", *hey[1:]], capture_output=True, timeout=burst_s + 120)
    elapsed = time.monotonic() - t0
    cpu = meter.stop()
    after = counting["m"].snapshot()
    lines = out.stdout.decode().splitlines()[1:]
    ok = sum(1 for line in lines if line.split(",")[6] == "200")
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}
    calls = {k: v for k, v in calls.items() if v}
    return {
        "burst_s": round(elapsed, 2),
        "concurrency": concurrency,
        "requests_ok": ok,
        "requests_failed": len(lines) - ok,
        "manager_calls_during_burst": calls,
        "per_request_calls": {k: round(v / max(1, ok), 5) for k, v in calls.items()},
        "manager_cpu_s_during_burst": cpu.get("manager"),
        "note": "report_demand is the router's periodic load report (report_interval_s = 1 s), not per request; "
        "wait_routing is the pending long-poll (counted when issued)",
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=None, help="registry sizes, comma-separated (default 10,1000; quick 10)")
    p.add_argument("--calls", type=int, help="calls per operation per block (default 1000, quick 100)")
    p.add_argument("--blocks", type=int, help="alternating HTTP/Ray blocks (default 3, quick 1)")
    p.add_argument("--burst", type=float, help="seconds of inference in part 2 (default 20, quick 5)")
    p.add_argument("--skip-burst", action="store_true")
    p.add_argument("--skip-calls", action="store_true")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, quick 0)")
    a = p.parse_args()
    sizes = [int(x) for x in (a.models or ("10" if a.quick else "10,1000")).split(",")]
    calls = a.calls or (100 if a.quick else 1000)
    blocks = a.blocks or (1 if a.quick else 3)
    burst = a.burst or (5.0 if a.quick else 20.0)
    name = "control_calls_quick" if a.quick else "control_calls"

    procs = Procs("ctl")
    auth, client_key = auth_env()
    env = {**base_env(procs.tmp), **auth}
    os.environ.update(auth)  # the actor's credentials come from this process (AuthSettings.from_env)
    admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
    result: dict[str, Any] = {
        **result_header("control_calls"),
        "settings": {"registry_sizes": sizes, "calls": calls, "blocks": blocks, "burst_s": burst},
    }
    import ray

    try:
        result["quiet"] = wait_for_quiet(
            a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400), own_marker=str(procs.tmp)
        )
        cluster = RayCluster(procs).start()
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        procs.cleanups.append(ray.shutdown)
        # A Ray round trip with nothing behind it, as the floor of every actor call.
        result["ray_floor_us"] = ray_floor(calls)
        result["calls"] = []
        for n in [] if a.skip_calls else sizes:
            log(f"control calls with {n} registered models")
            res = part1(procs, env, admin, n, calls, blocks)
            result["calls"].append(res)
            log(
                f"  p50 us http {[res['http'][op]['p50'] for op in res['http']]} "
                f"ray {[res['ray'][op]['p50'] for op in res['ray']]}"
            )
        ray.shutdown()
        if not a.skip_burst:
            result["burst"] = part2(procs, env, admin, client_key, burst, 8)
            log(f"burst: {result['burst']}")
    finally:
        result["loadavg_end"] = list(os.getloadavg())
        procs.stop_all()
    write_result(name, result)


def ray_floor(calls: int) -> dict[str, Any]:
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        async def ping(self) -> int:
            return 1

    echo = Echo.remote()

    async def run() -> list[float]:
        for _ in range(20):
            await echo.ping.remote()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await echo.ping.remote()
            times.append(time.perf_counter() - t0)
        return times

    times = asyncio.run(run())
    ray.kill(echo)
    return summary(times, 1e6, 1)


if __name__ == "__main__":
    main()
