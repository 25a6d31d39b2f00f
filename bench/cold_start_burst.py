"""Cold starts in a burst: N models at zero replicas asked for at once, against N vLLMs started by hand at once.

  reference   spawn N `python -m vllm.entrypoints.openai.api_server` at once (the arguments the worker gives its
              CPU engines, one served name each), poll each GET /health, then send each its request: time from the
              spawns to each first streamed token.
  ours        a stack (manager, router, one worker with CPU_SLOTS=N; not timed) with the worker's defaults: every
              engine forked from the worker's fork server (ENGINE_FORK_SERVER=1). N models of the same weights,
              registered with preload false (state cold), one request to each at once: time from sending them to
              each first streamed token.
  no_fork_server  the same, ENGINE_FORK_SERVER=0 (each engine imports torch and vLLM itself)

What this adds to bench/cold_start.py (one model at a time): with the fork server, a start that comes while another
is under way skips the imports too; a pool of ready standbys would have had one to give. Rounds run every kind
once, in an order rotated round by round; the summary is the median over rounds of each variant's ratio to the
reference of the same round, for the last first token of the burst (all served) and for the median one.

    .venv/bin/python bench/cold_start_burst.py --quick          # 2 models, 1 round
    .venv/bin/python bench/cold_start_burst.py --models 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import ALIAS, cold_stacks, first_token, settle
from common import (
    Procs,
    Stack,
    auth_env,
    base_env,
    engine_command,
    free_port,
    http_ok,
    log,
    median,
    ratio,
    result_header,
    summary,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)

VARIANTS: dict[str, dict[str, str]] = {
    "ours": {},
    "no_fork_server": {"ENGINE_FORK_SERVER": "0"},
}


def aliases(n: int) -> list[str]:
    return [f"{ALIAS}-{i}" for i in range(n)]


def times(t0: float, tokens: list[float]) -> dict[str, Any]:
    spans = sorted(round(t - t0, 3) for t in tokens)
    return {"last_s": spans[-1], "median_s": median(spans), "first_tokens_s": spans}


def reference(procs: Procs, model: Path, env: dict[str, str], n: int, timeout: float) -> dict[str, Any]:
    names = aliases(n)
    ports = [free_port() for _ in names]
    engine_env = {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")} | {"PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    started = [
        procs.start(f"vllm-direct-{port}", engine_command(model, name, port), engine_env)
        for name, port in zip(names, ports, strict=True)
    ]

    def one(i: int) -> float:
        url = f"http://127.0.0.1:{ports[i]}"
        wait_until(lambda: started[i].check() or http_ok(f"{url}/health"), timeout, interval=0.1, what=names[i])
        return first_token(url, {}, 60, model=names[i])

    try:
        with ThreadPoolExecutor(n) as pool:
            tokens = list(pool.map(one, range(n)))
    finally:
        for proc in started:
            proc.stop()
    return times(t0, tokens)


def ours(stack: Stack, headers: dict[str, str], n: int, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = list(pool.map(lambda name: first_token(stack.url, headers, timeout, model=name), aliases(n)))
    return times(t0, tokens)


def wait_cold(stack: Stack, admin: dict[str, str], worker_headers: dict[str, str], n: int, timeout: float) -> None:
    def cold() -> bool:
        states = [
            httpx.get(f"{stack.url}/v1/models/{name}", headers=admin, timeout=10).json()["state"] for name in aliases(n)
        ]
        engines = httpx.get(f"{stack.worker_url}/engines", headers=worker_headers, timeout=10).json()
        return set(states) == {"cold"} and engines == []

    wait_until(cold, timeout, interval=0.5, what="scale to zero")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", type=int, default=2, help="models asked for at once (default 2)")
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    p.add_argument("--idle-timeout", type=float, default=3.0, help="seconds idle before scale to zero")
    p.add_argument("--settle", type=float, default=15.0, help="seconds between two timed bursts")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, quick 0)")
    a = p.parse_args()
    n = a.models
    rounds = a.rounds or (1 if a.quick else 3)
    name = "cold_start_burst_quick" if a.quick else "cold_start_burst"
    procs = Procs("burst")
    auth, client_key = auth_env()
    admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
    client = {"authorization": f"Bearer {client_key}"}
    worker_headers = {"authorization": f"Bearer {auth['SVLLM_WORKER_TOKEN']}"}
    common_env = {**auth, "HEARTBEAT_INTERVAL": "5", "CPU_SLOTS": str(n)}
    result: dict[str, Any] = {
        **result_header("cold_start_burst"),
        "settings": {"models": n, "rounds": rounds, "variants": VARIANTS, "idle_timeout_s": a.idle_timeout},
    }
    runs: list[dict[str, Any]] = []
    try:
        model = tiny_model(procs.tmp)
        ref_env = {**base_env(procs.tmp), **common_env}
        stacks = cold_stacks(procs, VARIANTS, common_env, model, aliases(n), admin, a.idle_timeout)
        # One burst per stack first, not timed: the page cache holds vLLM's files for every timed start alike.
        for v, stack in stacks.items():
            log(f"warm-up burst of {v} (not timed)")
            ours(stack, client, n, 900)
            wait_cold(stack, admin, worker_headers, n, 300)
        settle(a.settle)
        result["quiet"] = wait_for_quiet(
            a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400), own_marker=str(procs.tmp)
        )
        kinds = ["reference", *VARIANTS]
        for r in range(rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                if kind == "reference":
                    res = reference(procs, model, ref_env, n, 900)
                else:
                    res = ours(stacks[kind], client, n, 900)
                    wait_cold(stacks[kind], admin, worker_headers, n, 300)
                res.update(round=r, kind=kind, loadavg=os.getloadavg()[0])
                runs.append(res)
                log(f"round {r} {kind}: first tokens after {res['first_tokens_s']} s")
                settle(a.settle)
        result["summary"] = summarise(runs)
        result["runs"] = runs
    finally:
        result["loadavg_end"] = list(os.getloadavg())
        procs.stop_all()
    write_result(name, result)
    print(json.dumps(result.get("summary", {}), indent=1))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ref = {r["round"]: r for r in runs if r["kind"] == "reference"}
    out: dict[str, Any] = {
        "reference_last_s": summary(r["last_s"] for r in ref.values()),
        "reference_median_s": summary(r["median_s"] for r in ref.values()),
    }
    for v in VARIANTS:
        mine = [r for r in runs if r["kind"] == v and r["round"] in ref]
        out[v] = {
            "last_s": summary(r["last_s"] for r in mine),
            "median_s": summary(r["median_s"] for r in mine),
            "last_paired_ratio_median": median([ratio(r["last_s"], ref[r["round"]]["last_s"]) for r in mine]),
            "median_paired_ratio_median": median([ratio(r["median_s"], ref[r["round"]]["median_s"]) for r in mine]),
        }
    return out


if __name__ == "__main__":
    main()
