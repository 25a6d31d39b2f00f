"""Router overhead of keys made at run time (issue 20): 10,000 keys with limits on, against credentials off.

One plain-HTTP stack of bench/hot_path.py with the stand-in engine (bench/fake_vllm: instant answers, so the
router's own work is what is measured), and three routers on its manager, measured in interleaved rounds:
  noauth   no credential checked on the client side (the reference): the router's app with auth off, served as
           `svllm router` serves it (it still presents its credentials to the manager and the worker)
  envkey   credentials on, a key of SVLLM_API_KEYS (no limits: the environment's keys)
  keys     credentials on, one of 10,000 keys made with POST /keys, with rpm, tpm and max_concurrent limits set
           high enough never to be reached (each request checks and takes them, and its answer's usage is read)
Load: non-streaming completions (8 tokens) with `hey` at each concurrency; the summary gives, per concurrency,
keys / noauth and envkey / noauth requests per second paired within each round, and their median.

    .venv/bin/python bench/tenant_keys.py            # 3 rounds of 5 s per run
    .venv/bin/python bench/tenant_keys.py --quick    # 1 round of 2 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SVLLM,
    CPUMeter,
    Proc,
    free_port,
    http_ok,
    loadavg,
    log,
    median,
    result_header,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)
from hot_path import Setup, body, run_hey, spy

KEYS = 10_000
LIMITS = {"rpm": 10_000_000, "tpm": 10_000_000_000, "max_concurrent": 100_000}


@dataclass
class Router:
    url: str
    proc: Proc

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_router(
    setup: Setup,
    name: str,
    mport: int,
    env: dict[str, str],
    clients_unchecked: bool = False,
    under: tuple[str, ...] = (),
    timeout_s: float = 60.0,
) -> Router:
    """`svllm router`; `clients_unchecked`: the same app with no credential checked on the client side (it still
    presents the admin key to the manager and the worker token to the worker, which SVLLM_AUTH=off would not).
    `under`: a command to run it under (valgrind, in bench/router_instructions.py)."""
    port = free_port()
    args = [SVLLM, "router", "--host", "127.0.0.1", "--port", str(port), "--manager-url", f"http://127.0.0.1:{mport}"]
    if clients_unchecked:
        code = (
            "from serverless_vllm.cli import _run, _server; from serverless_vllm.router.app import create_router_app; "
            "from serverless_vllm.config import AuthSettings, RouterSettings; "
            "from serverless_vllm.manager.http_client import HTTPManagerClient; "
            f"s = RouterSettings.from_env(host='127.0.0.1', port={port}, manager_url='http://127.0.0.1:{mport}'); "
            "a = AuthSettings.from_env(); "
            "app = create_router_app(s, lambda: HTTPManagerClient(s.manager_url, headers=a.admin_headers()), "
            "upstream_headers=a.worker_headers(), auth=AuthSettings(mode='off')); "
            f"_run(_server(app, '127.0.0.1', {port}, 'warning').serve())"
        )
        args = ["-c", code]
    router = setup.procs.start(
        f"router-{name}", [*under, sys.executable, *args] if under or clients_unchecked else args, env
    )
    wait_until(lambda: router.check() or http_ok(f"http://127.0.0.1:{port}/health"), timeout_s, what=f"router {name}")
    return Router(f"http://127.0.0.1:{port}", router)


def make_keys(setup: Setup, mport: int) -> str:
    """KEYS keys in the manager (through its HTTP API, with the admin key); returns the secret of the last one."""
    t0 = time.monotonic()
    secret = ""
    with httpx.Client(base_url=f"http://127.0.0.1:{mport}", headers=setup.admin, timeout=30) as client:
        for i in range(KEYS):
            spec = {"name": f"bench-{i}", "tenant": f"tenant-{i % 100}", "models": ["*"], "limits": LIMITS}
            resp = client.post("/keys", json=spec)
            resp.raise_for_status()
            secret = resp.json()["secret"]
    log(f"{KEYS} keys made in {time.monotonic() - t0:.1f} s")
    return str(secret)


def start_keyed_stack(setup: Setup) -> tuple[int, dict[str, dict[str, str]], Path]:
    """The stack (manager, worker, stand-in engine) with KEYS keys made: the manager's port, each configuration's
    client headers (noauth, envkey, keys) and the request body's file (a completion of 8 tokens)."""
    model = tiny_model(setup.tmp)
    _, setup.engine_ports, mport = setup._start_http_stack("", [SVLLM], setup.env, {}, model)
    secret = make_keys(setup, mport)
    headers = {"noauth": {}, "envkey": setup.headers, "keys": {"authorization": f"Bearer {secret}"}}
    body_path = setup.tmp / "body.json"
    body_path.write_text(json.dumps(body(8)))
    return mport, headers, body_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 600, quick 0)")
    p.add_argument("--profile", action="store_true", help="py-spy the keys and noauth routers at c=8 afterwards")
    a = p.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    duration = a.duration or (2.0 if a.quick else 5.0)
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    hot = argparse.Namespace(fake_engine=True, replicas=1, fake_interval_ms=10.0)
    setup = Setup(hot)
    result: dict[str, Any] = {
        **result_header("tenant_keys"),
        "settings": {"rounds": rounds, "duration_s": duration, "concurrency": concurrencies, "keys": KEYS},
    }
    try:
        mport, headers, body_path = start_keyed_stack(setup)
        whole = setup.cpu_groups()
        stack_groups = {g: whole[g] for g in ("engine", "worker", "manager")}
        configs = list(headers)
        wait = a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 600)
        result["quiet"] = wait_for_quiet(wait, own_marker=str(setup.tmp))
        runs: list[dict[str, Any]] = []
        for r in range(rounds):
            # Fresh routers every round: one process runs some microseconds a request faster than another started
            # the same way (measured: 8 µs of ~200), which new processes each round average out instead of
            # giving one configuration for the whole run. `envkey` and `keys` share their process.
            routers = {
                "noauth": start_router(setup, f"noauth-{r}", mport, setup.env, clients_unchecked=True),
                "keyed": start_router(setup, f"keyed-{r}", mport, setup.env),
            }
            serving = {"noauth": routers["noauth"], "envkey": routers["keyed"], "keys": routers["keyed"]}
            wait_until(
                partial(http_ok, f"{routers['keyed'].url}/v1/models", headers["keys"]),
                60,
                what="the keyed router has the key",
            )
            for cfg in configs:  # warm every path
                run_hey(serving[cfg].url, headers[cfg], 4, 1.0, body_path, None)
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for c in concurrencies:
                for cfg in order:
                    groups = {**stack_groups, "router": partial(list, [serving[cfg].pid])}
                    meter = CPUMeter(groups)
                    res = run_hey(serving[cfg].url, headers[cfg], c, duration, body_path, meter)
                    res["router_cpu_us_per_request"] = round(1e6 * res["cpu_s"]["router"] / max(1, res["ok"]), 1)
                    # Everything the request costs the machine: router, worker, stand-in, manager and `hey`.
                    total = sum(res["cpu_s"][g] for g in ("router", *stack_groups, "client"))
                    res["total_cpu_us_per_request"] = round(1e6 * total / max(1, res["ok"]), 1)
                    runs.append({"round": r, "config": cfg, "concurrency": c, **res})
                    log(
                        f"round {r} c={c} {cfg}: {res['rps']} req/s, p50 {res['latency_ms']['p50']:.2f} ms, CPU per "
                        f"request: router {res['router_cpu_us_per_request']} µs, all "
                        f"{res['total_cpu_us_per_request']} µs; CPU s {res['cpu_s']}"
                    )
            if a.profile and r == rounds - 1:
                result["profile"] = {
                    cfg: spy(
                        serving[cfg].pid,
                        12,
                        setup.tmp / f"profile-{cfg}.txt",
                        partial(run_hey, serving[cfg].url, headers[cfg], 8, 10.0, body_path, None),
                    )
                    for cfg in ("keys", "noauth")
                }
            for router in routers.values():
                router.proc.stop()
        result["runs"] = runs
        result["summary"] = summarise(runs, rounds, concurrencies)
        result["loadavg_at_end"] = loadavg()
        log(json.dumps(result["summary"], indent=2))
    finally:
        setup.stop()
    write_result("tenant_keys" + ("_quick" if a.quick else ""), result)


def summarise(runs: list[dict[str, Any]], rounds: int, concurrencies: list[int]) -> dict[str, Any]:
    rps = {(x["round"], x["config"], x["concurrency"]): x["rps"] for x in runs}
    out: dict[str, Any] = {}
    for c in concurrencies:
        row: dict[str, Any] = {}
        for cfg in ("keys", "envkey"):
            paired = [rps[(r, cfg, c)] / rps[(r, "noauth", c)] for r in range(rounds) if rps[(r, "noauth", c)]]
            row[f"{cfg}_over_noauth"] = [round(x, 3) for x in paired]
            row[f"{cfg}_over_noauth_median"] = round(median(paired) or 0.0, 3)
        cpu = {(x["round"], x["config"], x["concurrency"]): x["router_cpu_us_per_request"] for x in runs}
        keys_cpu = [cpu[(r, "keys", c)] / cpu[(r, "noauth", c)] for r in range(rounds) if cpu[(r, "noauth", c)]]
        row["router_cpu_keys_over_noauth"] = [round(x, 3) for x in keys_cpu]
        row["router_cpu_keys_over_noauth_median"] = round(median(keys_cpu) or 0.0, 3)
        row["router_cpu_us_per_request_median"] = {
            cfg: median([cpu[(r, cfg, c)] for r in range(rounds)]) for cfg in ("noauth", "envkey", "keys")
        }
        total = {(x["round"], x["config"], x["concurrency"]): x["total_cpu_us_per_request"] for x in runs}
        row["total_cpu_us_per_request_median"] = {
            cfg: median([total[(r, cfg, c)] for r in range(rounds)]) for cfg in ("noauth", "envkey", "keys")
        }
        row["rps_median"] = {
            cfg: median([rps[(r, cfg, c)] for r in range(rounds)]) for cfg in ("noauth", "envkey", "keys")
        }
        out[str(c)] = row
    return out


if __name__ == "__main__":
    main()
