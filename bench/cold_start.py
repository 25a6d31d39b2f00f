"""Cold start (issue 8.3): a request for a model at zero replicas vs starting vLLM by hand, same model, same
arguments, same request, same run.

  reference  spawn `python -m vllm.entrypoints.openai.api_server` with the arguments the worker gives its CPU
             engines, poll GET /health every 100 ms, then send the request: time from the spawn to the first
             streamed token.
  ours       the stack is up (manager, router, worker; not timed), the model is registered with preload false
             (state cold): time from sending the request to the router to its first streamed token. The router
             holds the request, the manager places a replica, the worker starts the engine, the router forwards.

Rounds alternate reference and ours. Between rounds the model scales back to zero by itself (idle_timeout_s).
A side thread records when the engine process appears and when its own /health first answers, which splits our
time into: placement and spawn, engine boot, and ready-to-first-token (readiness detection by the worker, the
heartbeat, the routing-table push, forwarding and the prefill).

On GPU workers a model that idled goes to vLLM sleep first and wakes in seconds; the CPU build refuses sleep
mode, so there is no wake-from-sleep number on this machine.

    .venv/bin/python bench/cold_start.py --quick
    .venv/bin/python bench/cold_start.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ENGINE_MODULE,
    SVLLM,
    Procs,
    auth_env,
    base_env,
    cmdline,
    engine_command,
    free_port,
    http_ok,
    log,
    machine_info,
    median,
    pids_matching,
    ratio,
    summary,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)

ALIAS = "tiny"
REQUEST = {
    "model": ALIAS,
    "prompt": "Once upon a time",
    "max_tokens": 8,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def first_token(url: str, headers: dict[str, str], timeout: float) -> float:
    """Send the streaming request; return the perf_counter time of the first token event."""
    with httpx.stream("POST", f"{url}/v1/completions", json=REQUEST, headers=headers, timeout=timeout) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.read()[:500]!r}")
        first = None
        for line in resp.iter_lines():  # read to the end
            if first is None and line.startswith("data: ") and line != "data: [DONE]" and '"choices"' in line:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("stream ended without a token")
    return first


class EngineWatch(threading.Thread):
    """Records when an engine of this run appears and when its /health first answers."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.spawned: float | None = None
        self.healthy: float | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        port = None
        while not self.stop_flag.is_set() and self.healthy is None:
            if port is None:
                pids = pids_matching(ENGINE_MODULE, self.marker)
                if pids:
                    self.spawned = time.perf_counter()
                    args = cmdline(pids[0]).split()
                    port = int(args[args.index("--port") + 1])
            else:
                try:
                    if http_ok(f"http://127.0.0.1:{port}/health"):
                        self.healthy = time.perf_counter()
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)


def reference(procs: Procs, model: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    port = free_port()
    t0 = time.perf_counter()
    proc = procs.start(
        f"vllm-direct-{port}",
        engine_command(model, ALIAS, port),
        {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")} | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_until(
            lambda: proc.check() or http_ok(f"http://127.0.0.1:{port}/health"),
            timeout,
            interval=0.1,
            what="vLLM started by hand",
        )
        healthy = time.perf_counter()
        tok = first_token(f"http://127.0.0.1:{port}", {}, 60)
    finally:
        proc.stop()
    return {"ttft_s": round(tok - t0, 3), "engine_ready_s": round(healthy - t0, 3)}


def ours(router: str, headers: dict[str, str], marker: str, timeout: float) -> dict[str, Any]:
    watch = EngineWatch(marker)
    watch.start()
    t0 = time.perf_counter()
    try:
        tok = first_token(router, headers, timeout)
    finally:
        watch.stop_flag.set()
        watch.join(5)
    out: dict[str, Any] = {"ttft_s": round(tok - t0, 3)}
    if watch.spawned is not None and watch.healthy is not None:
        out["phases_s"] = {
            "placement_and_spawn": round(watch.spawned - t0, 3),
            "engine_boot": round(watch.healthy - watch.spawned, 3),
            "ready_to_first_token": round(tok - watch.healthy, 3),
        }
    return out


def wait_cold(router: str, headers: dict[str, str], marker: str, timeout: float) -> None:
    wait_until(
        lambda: (
            httpx.get(f"{router}/v1/models/{ALIAS}", headers=headers, timeout=10).json()["state"] == "cold"
            and not pids_matching(ENGINE_MODULE, marker)
        ),
        timeout,
        interval=0.5,
        what="scale to zero",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, help="rounds of (reference, ours) (default 3, quick 1)")
    p.add_argument("--idle-timeout", type=float, default=3.0, help="seconds idle before scale to zero")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, quick 0)")
    a = p.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    name = "cold_start_quick" if a.quick else "cold_start"
    procs = Procs("cold")
    auth, client_key = auth_env()
    env = {**base_env(procs.tmp), **auth, "HEARTBEAT_INTERVAL": "5", "CPU_SLOTS": "1"}
    admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
    client = {"authorization": f"Bearer {client_key}"}
    result: dict[str, Any] = {
        "benchmark": "cold_start",
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "settings": {
            "rounds": rounds,
            "request": REQUEST,
            "engine_args": "--dtype auto --tensor-parallel-size 1 --max-model-len 512 --enforce-eager",
            "VLLM_CPU_KVCACHE_SPACE": env["VLLM_CPU_KVCACHE_SPACE"],
            "worker_heartbeat_interval_s": env["HEARTBEAT_INTERVAL"],
        },
        "gpu_wake_from_sleep": "not measured: no GPU on this machine (the CPU build of vLLM "
        "refuses --enable-sleep-mode)",
    }
    runs: list[dict[str, Any]] = []
    try:
        model = tiny_model(procs.tmp)
        mport, rport, wport = free_port(), free_port(), free_port()
        manager = procs.start("manager", [SVLLM, "manager", "--host", "127.0.0.1", "--port", str(mport)], env)
        wait_until(lambda: manager.check() or http_ok(f"http://127.0.0.1:{mport}/health"), 60, what="manager")
        router = procs.start(
            "router",
            [
                SVLLM,
                "router",
                "--host",
                "127.0.0.1",
                "--port",
                str(rport),
                "--manager-url",
                f"http://127.0.0.1:{mport}",
            ],
            env,
        )
        url = f"http://127.0.0.1:{rport}"
        wait_until(lambda: router.check() or http_ok(f"{url}/health"), 60, what="router")
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
            env,
        )
        wait_until(lambda: worker.check() or http_ok(f"http://127.0.0.1:{wport}/health"), 60, what="worker")
        spec = {
            "alias": ALIAS,
            "model_name": str(model),
            "max_model_len": 512,
            "min_replicas": 0,
            "max_replicas": 1,
            "idle_timeout_s": a.idle_timeout,
            "preload": False,
        }
        httpx.post(f"{url}/v1/models/register", json=spec, headers=admin, timeout=60).raise_for_status()
        wait_until(
            lambda: "bench-w1" in httpx.get(f"{url}/workers", headers=admin, timeout=10).text,
            60,
            what="worker registered",
        )
        # One start first, not timed: the page cache holds vLLM's files for every timed start alike.
        log("warm-up start (not timed)")
        ours(url, client, str(procs.tmp / "models"), 900)
        wait_cold(url, admin, str(procs.tmp / "models"), 300)
        result["quiet"] = wait_for_quiet(
            a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400), own_marker=str(procs.tmp)
        )
        for r in range(rounds):
            order = ("reference", "ours") if r % 2 == 0 else ("ours", "reference")
            for kind in order:
                if kind == "reference":
                    res = reference(procs, model, env, 900)
                else:
                    res = ours(url, client, str(procs.tmp / "models"), 900)
                    wait_cold(url, admin, str(procs.tmp / "models"), 300)
                res.update(round=r, kind=kind, loadavg=os.getloadavg()[0])
                runs.append(res)
                log(f"round {r} {kind}: first token after {res['ttft_s']:.2f} s {res.get('phases_s', '')}")
        ref = [r["ttft_s"] for r in runs if r["kind"] == "reference"]
        our = [r["ttft_s"] for r in runs if r["kind"] == "ours"]
        result["summary"] = {
            "reference_ttft_s": summary(ref),
            "ours_ttft_s": summary(our),
            "ratio_median": ratio(median(our), median(ref)),
            "added_s_median": round(median(our) - median(ref), 3),
            "ours_phases_median_s": {
                k: median([r["phases_s"][k] for r in runs if "phases_s" in r])
                for k in ("placement_and_spawn", "engine_boot", "ready_to_first_token")
            },
            "reference_engine_ready_median_s": median([r["engine_ready_s"] for r in runs if r["kind"] == "reference"]),
        }
        result["runs"] = runs
    finally:
        result["loadavg_end"] = list(os.getloadavg())
        procs.stop_all()
    write_result(name, result)
    print(json.dumps(result.get("summary", {}), indent=1))


if __name__ == "__main__":
    main()
