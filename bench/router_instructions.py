"""The router's own work per request, counted in CPU instructions (valgrind's callgrind): noauth, envkey and keys.

Requests per second on these shared 2-core machines move by 5-10% between rounds of the same configuration
(bench/tenant_keys.py), more than the differences it is asked to show. The instructions a router process executes
for a request depend far less on the machine's load: on a quiet machine the same run, repeated, gives the same count
to within 0.1%; with another process busy, counts of one configuration moved by up to 2% (2026-12-01: how the
event loop's turns batch the requests changes). A change to one piece of the tenant gate is counted alone by
bench/gate_instructions.py. So this benchmark runs each router under callgrind (instrumentation switched on only while `hey` sends a fixed
number of requests) and divides its instruction count by the requests. What it does not see: cache misses and
waits, and the work of the other processes (a slower router also makes the worker and the client batch less:
docs/benchmarks.md). The same stack as bench/tenant_keys.py (the stand-in engine, 10,000 keys made with limits):
  noauth   the router's app with no client credential checked
  envkey   `svllm router`, a key of SVLLM_API_KEYS
  keys     the same process, one of the 10,000 keys with rpm, tpm and max_concurrent (never reached)
Each configuration is counted twice, alternating; the load and usage reports are set 30 s apart so that their
work (per second, not per request: a valgrind-slowed router serves ~50 requests a second) is not counted.

    .venv/bin/python bench/router_instructions.py              # 504 requests a count, 2 rounds (about a minute)
    .venv/bin/python bench/router_instructions.py --quick      # 104 requests, 1 round
    .venv/bin/python bench/router_instructions.py --keep DIR   # and keep callgrind's dumps there (one per count,
                                                               # for callgrind_annotate: which C functions differ)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import http_ok, loadavg, log, median, result_header, wait_for_quiet, wait_until, write_result
from hot_path import Setup
from tenant_keys import Router, start_keyed_stack, start_router

CONCURRENCY = 8


def hey(url: str, headers: dict[str, str], requests: int, body_path: Path) -> str:
    """`hey` sends `requests` completions at CONCURRENCY; its report, checked for that many answers of 200."""
    cmd = ["hey", "-n", str(requests), "-c", str(CONCURRENCY), "-m", "POST", "-T", "application/json"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    done = subprocess.run(
        [*cmd, "-D", str(body_path), "-t", "120", f"{url}/v1/completions"], text=True, capture_output=True
    )
    if f"[200]\t{requests} responses" not in done.stdout:
        raise RuntimeError(f"hey did not get {requests} answers of 200: {done.stdout[-600:]}")
    return done.stdout


def count(router: Router, headers: dict[str, str], requests: int, body_path: Path, out: Path) -> int:
    """Instructions the router executed for `requests` requests."""
    pid = str(router.pid)
    subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
    try:
        hey(router.url, headers, requests, body_path)
    finally:
        subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True)
    before = set(out.parent.glob(f"{out.name}.{pid}.*"))
    subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
    dump = wait_until(lambda: set(out.parent.glob(f"{out.name}.{pid}.*")) - before, 30, what="callgrind's dump")
    totals = [line for line in Path(dump.pop()).read_text().splitlines() if line.startswith("totals:")]
    return int(totals[0].split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, help="requests per count, a multiple of 8 (default 504, quick 104)")
    p.add_argument("--rounds", type=int, help="counts of each configuration (default 2, quick 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--keep", type=Path, help="a folder to keep callgrind's dumps in (router.<pid>.<count>)")
    a = p.parse_args()
    a.requests = a.requests or (104 if a.quick else 504)
    a.rounds = a.rounds or (1 if a.quick else 2)
    setup = Setup(argparse.Namespace(fake_engine=True, replicas=1, fake_interval_ms=10.0))
    result: dict[str, Any] = {
        **result_header("router_instructions"),
        "settings": {"requests": a.requests, "rounds": a.rounds, "concurrency": CONCURRENCY},
    }
    out = Path(tempfile.mkdtemp(prefix="svb-callgrind-")) / "router"
    try:
        mport, headers, body_path = start_keyed_stack(setup)
        env = {**setup.env, "REPORT_INTERVAL": "30"}
        result["quiet"] = wait_for_quiet(0, own_marker=str(setup.tmp))  # recorded only: counts do not need quiet
        under = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p")
        routers = {
            "noauth": start_router(setup, "noauth", mport, env, clients_unchecked=True, under=under, timeout_s=600),
            "keyed": start_router(setup, "keyed", mport, env, under=under, timeout_s=600),
        }
        serving = {"noauth": routers["noauth"], "envkey": routers["keyed"], "keys": routers["keyed"]}
        wait_until(partial(http_ok, f"{routers['keyed'].url}/v1/models", headers["keys"]), 120, what="the key")
        for cfg, router in serving.items():  # warm every path (instrumentation off: not counted)
            hey(router.url, headers[cfg], 200, body_path)
        counts: dict[str, list[float]] = {cfg: [] for cfg in serving}
        for r in range(a.rounds):
            for cfg in list(serving)[:: 1 if r % 2 == 0 else -1]:
                per_request = count(serving[cfg], headers[cfg], a.requests, body_path, out) / a.requests
                counts[cfg].append(round(per_request))
                log(f"round {r} {cfg}: {per_request:,.0f} instructions a request")
                time.sleep(0.5)
        for router in routers.values():
            router.proc.stop()
        med = {cfg: median(v) or 0.0 for cfg, v in counts.items()}
        result["instructions_per_request"] = counts
        result["summary"] = {
            "median": med,
            "keys_over_noauth": round(med["keys"] / med["noauth"], 3),
            "envkey_over_noauth": round(med["envkey"] / med["noauth"], 3),
            "keys_minus_envkey": round(med["keys"] - med["envkey"]),
        }
        result["loadavg_at_end"] = loadavg()
        log(json.dumps(result["summary"], indent=2))
    finally:
        setup.stop()
        for f in out.parent.glob("*"):
            if a.keep is not None:
                a.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, a.keep)
            os.remove(f)
        out.parent.rmdir()
    write_result("router_instructions" + ("_quick" if a.quick else ""), result)


if __name__ == "__main__":
    main()
