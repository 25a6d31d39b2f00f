"""Cold start (issue 18): a request for a model at zero replicas vs starting vLLM by hand, same model, same
arguments, same request, same run; and each lever of the worker's start on its own.

  reference   spawn `python -m vllm.entrypoints.openai.api_server` with the arguments the worker gives its CPU
              engines, poll GET /health every 100 ms, then send the request: time from the spawn to the first
              streamed token.
  ours        a stack (manager, router, worker; not timed) with the worker's defaults: the engine forked from the
              fork server (ENGINE_FORK_SERVER=1: vLLM imported before the request), the model worker inside vLLM's EngineCore
              (CPU_ENGINE_UNIPROC=1: one process fewer). The model is registered with preload false (state cold):
              time from sending the request to the router to its first streamed token.
              Its EngineCore is forked from the API server, imports done (CPU_ENGINE_CORE_FORK=1).
  no_fork     the same, CPU_ENGINE_CORE_FORK=0        (vLLM's spawn of the EngineCore: imports again)
  no_standby  the same, ENGINE_FORK_SERVER=0         (uniproc and fork: a plain start)
  no_uniproc  the same, CPU_ENGINE_UNIPROC=0          (the fork server alone: several processes, vLLM spawns)
  neither     all off: the engine start before issue 18

Each variant has a stack of its own. Rounds run every kind once, in an order rotated round by round; the summary
is the median over rounds of each variant's ratio to the reference of the same round. Between rounds each model
scales back to zero by itself (idle_timeout_s) and the machine settles.
A side thread polls the worker's GET /engines and the engine's /health, which splits our time into placement and
spawn (or fork), engine boot and ready-to-first-token; vLLM's own log lines split the boot further into
weights, engine init (profile, KV cache, warm-up) and the rest (Python imports and process starts).

On GPU workers a model that idled goes to vLLM sleep first and wakes in seconds; the CPU build refuses sleep
mode, so there is no wake-from-sleep number on this machine.

    .venv/bin/python bench/cold_start.py --quick
    .venv/bin/python bench/cold_start.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
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

ALIAS = "tiny"
REQUEST = {
    "model": ALIAS,
    "prompt": "Once upon a time",
    "max_tokens": 8,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def first_token(url: str, headers: dict[str, str], timeout: float, model: str = ALIAS) -> float:
    """Send the streaming request; return the perf_counter time of the first token event."""
    body = REQUEST | {"model": model}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=timeout) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.read()[:500]!r}")
        first = None
        for line in resp.iter_lines():  # read to the end
            if first is None and line.startswith("data: ") and line != "data: [DONE]" and '"choices"' in line:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("stream ended without a token")
    return first


VARIANTS: dict[str, dict[str, str]] = {
    "ours": {},
    "no_fork": {"CPU_ENGINE_CORE_FORK": "0"},
    "no_standby": {"ENGINE_FORK_SERVER": "0"},
    "no_uniproc": {"CPU_ENGINE_UNIPROC": "0"},
    "neither": {"ENGINE_FORK_SERVER": "0", "CPU_ENGINE_UNIPROC": "0", "CPU_ENGINE_CORE_FORK": "0"},
}

_WEIGHTS = re.compile(r"Loading weights took ([\d.]+) s")
_INIT_MODEL = re.compile(r"Initializing model took ([\d.]+) s")
_ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")
_LAUNCH = "=== serverless-vllm launch"


def vllm_phases(lines: list[str], boot_s: float) -> dict[str, float]:
    """The boot split by vLLM's own log lines (of the last launch): weights, engine init, and the rest."""
    last = max((i for i, line in enumerate(lines) if line.startswith(_LAUNCH)), default=0)
    found: dict[str, float] = {}
    for line in lines[last:]:
        for key, pattern in (("weights", _WEIGHTS), ("model_init", _INIT_MODEL), ("engine_init", _ENGINE_INIT)):
            m = pattern.search(line)
            if m:
                found[key] = float(m.group(1))
    out = {"weights": found.get("weights", 0.0), "engine_init": found.get("engine_init", 0.0)}
    out["model_init"] = max(0.0, found.get("model_init", 0.0) - out["weights"])
    out["imports_and_processes"] = round(boot_s - sum(out.values()), 3)
    return {k: round(v, 3) for k, v in out.items()}


DECODE = {"model": ALIAS, "prompt": "Once upon a time", "max_tokens": 128, "temperature": 0, "ignore_eos": True}


def decode_rate(url: str, headers: dict[str, str], requests: int = 3) -> float:
    """Tokens per second of one request at a time, once the engine is up: what a start's levers must not cost
    (the model worker inside EngineCore, a process forked from the fork server)."""
    rates = []
    for _ in range(requests):
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=DECODE, headers=headers, timeout=120)
        r.raise_for_status()
        rates.append(r.json()["usage"]["completion_tokens"] / (time.perf_counter() - t))
    return round(median(rates) or 0.0, 1)


class EngineWatch(threading.Thread):
    """Records when the worker's engine gets a port (spawned or adopted) and when its /health first answers."""

    def __init__(self, worker_url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.worker_url = worker_url
        self.headers = headers
        self.spawned: float | None = None
        self.healthy: float | None = None
        self.replica: str | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        port = None
        while not self.stop_flag.is_set() and self.healthy is None:
            try:
                if port is None:
                    engines = httpx.get(f"{self.worker_url}/engines", headers=self.headers, timeout=5).json()
                    if engines and engines[0].get("port"):
                        self.spawned = time.perf_counter()
                        port, self.replica = engines[0]["port"], engines[0]["replica_id"]
                elif http_ok(f"http://127.0.0.1:{port}/health"):
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
        rate = decode_rate(f"http://127.0.0.1:{port}", {})
    finally:
        proc.stop()
    boot = healthy - t0
    return {
        "ttft_s": round(tok - t0, 3),
        "decode_tok_s": rate,
        "engine_ready_s": round(boot, 3),
        "vllm_phases_s": vllm_phases(proc.log_path.read_text(errors="replace").splitlines(), boot),
    }


def ours(stack: Stack, headers: dict[str, str], worker_headers: dict[str, str], timeout: float) -> dict[str, Any]:
    watch = EngineWatch(stack.worker_url, worker_headers)
    watch.start()
    t0 = time.perf_counter()
    try:
        tok = first_token(stack.url, headers, timeout)
    finally:
        watch.stop_flag.set()
        watch.join(5)
    out: dict[str, Any] = {"ttft_s": round(tok - t0, 3), "decode_tok_s": decode_rate(stack.url, headers)}
    if watch.spawned is not None and watch.healthy is not None:
        boot = watch.healthy - watch.spawned
        out["phases_s"] = {
            "placement_and_spawn": round(watch.spawned - t0, 3),
            "engine_boot": round(boot, 3),
            "ready_to_first_token": round(tok - watch.healthy, 3),
        }
        engine_log = stack.state_dir / "engines" / f"{watch.replica}.log"
        if engine_log.is_file():
            out["vllm_phases_s"] = vllm_phases(engine_log.read_text(errors="replace").splitlines(), boot)
    return out


def cold_stacks(
    procs: Procs,
    variants: dict[str, dict[str, str]],
    common_env: dict[str, str],
    model: Path,
    aliases: list[str],
    admin: dict[str, str],
    idle_timeout: float,
) -> dict[str, Stack]:
    """A stack per variant, each with `aliases` registered cold (preload false) and its worker registered."""
    stacks: dict[str, Stack] = {}
    for v, overrides in variants.items():
        (procs.tmp / v).mkdir(exist_ok=True)
        env = {**base_env(procs.tmp / v), **common_env, **overrides, "SVLLM_MODEL_DIRS": str(procs.tmp)}
        stack = Stack(procs, v, env)
        for alias in aliases:
            spec = {
                "alias": alias,
                "model_name": str(model),
                "max_model_len": 512,
                "min_replicas": 0,
                "max_replicas": 1,
                "idle_timeout_s": idle_timeout,
                "preload": False,
            }
            httpx.post(f"{stack.url}/v1/models/register", json=spec, headers=admin, timeout=60).raise_for_status()
        wait_until(
            lambda s=stack: s.worker_id in httpx.get(f"{s.url}/workers", headers=admin, timeout=10).text,
            60,
            what=f"{v} worker registered",
        )
        stacks[v] = stack
    return stacks


def wait_cold(stack: Stack, admin: dict[str, str], worker_headers: dict[str, str], timeout: float) -> None:
    wait_until(
        lambda: (
            httpx.get(f"{stack.url}/v1/models/{ALIAS}", headers=admin, timeout=10).json()["state"] == "cold"
            and httpx.get(f"{stack.worker_url}/engines", headers=worker_headers, timeout=10).json() == []
        ),
        timeout,
        interval=0.5,
        what="scale to zero",
    )


def settle(seconds: float) -> None:
    """Let the machine settle (the last start's processes, a fork server launched after it) before the next timed
    start."""
    time.sleep(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--idle-timeout", type=float, default=3.0, help="seconds idle before scale to zero")
    p.add_argument("--settle", type=float, default=15.0, help="seconds between two timed starts")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, quick 0)")
    a = p.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {sorted(unknown)}")
    name = "cold_start_quick" if a.quick else "cold_start"
    procs = Procs("cold")
    auth, client_key = auth_env()
    admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
    client = {"authorization": f"Bearer {client_key}"}
    worker_headers = {"authorization": f"Bearer {auth['SVLLM_WORKER_TOKEN']}"}
    common_env = {**auth, "HEARTBEAT_INTERVAL": "5", "CPU_SLOTS": "1"}
    result: dict[str, Any] = {
        **result_header("cold_start"),
        "settings": {
            "rounds": rounds,
            "variants": {v: VARIANTS[v] for v in variants},
            "request": REQUEST,
            "engine_args": "--dtype auto --tensor-parallel-size 1 --max-model-len 512 --enforce-eager",
            "worker_heartbeat_interval_s": common_env["HEARTBEAT_INTERVAL"],
        },
        "gpu_wake_from_sleep": "not measured: no GPU on this machine (the CPU build of vLLM "
        "refuses --enable-sleep-mode)",
    }
    runs: list[dict[str, Any]] = []
    try:
        model = tiny_model(procs.tmp)
        ref_env = {**base_env(procs.tmp), **common_env}
        stacks = cold_stacks(
            procs, {v: VARIANTS[v] for v in variants}, common_env, model, [ALIAS], admin, a.idle_timeout
        )
        # One start per stack first, not timed: the page cache holds vLLM's files for every timed start alike.
        for v, stack in stacks.items():
            log(f"warm-up start of {v} (not timed)")
            ours(stack, client, worker_headers, 900)
            wait_cold(stack, admin, worker_headers, 300)
        settle(a.settle)
        result["quiet"] = wait_for_quiet(
            a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400), own_marker=str(procs.tmp)
        )
        kinds = ["reference", *variants]
        for r in range(rounds):
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for kind in order:
                if kind == "reference":
                    res = reference(procs, model, ref_env, 900)
                else:
                    res = ours(stacks[kind], client, worker_headers, 900)
                    wait_cold(stacks[kind], admin, worker_headers, 300)
                res.update(round=r, kind=kind, loadavg=os.getloadavg()[0])
                runs.append(res)
                log(f"round {r} {kind}: first token after {res['ttft_s']:.2f} s {res.get('phases_s', '')}")
                settle(a.settle)
        result["summary"] = summarise(runs, variants)
        result["runs"] = runs
    finally:
        result["loadavg_end"] = list(os.getloadavg())
        procs.stop_all()
    write_result(name, result)
    print(json.dumps(result.get("summary", {}), indent=1))


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    ref = {r["round"]: r["ttft_s"] for r in runs if r["kind"] == "reference"}
    ref_rate = {r["round"]: r["decode_tok_s"] for r in runs if r["kind"] == "reference"}
    out: dict[str, Any] = {
        "reference_ttft_s": summary(ref.values()),
        "reference_decode_tok_s": median(ref_rate.values()),
    }
    out["reference_vllm_phases_median_s"] = phases_median([r for r in runs if r["kind"] == "reference"])
    for v in variants:
        mine = [r for r in runs if r["kind"] == v]
        paired = [ratio(r["ttft_s"], ref[r["round"]]) for r in mine if r["round"] in ref]
        out[v] = {
            "ttft_s": summary(r["ttft_s"] for r in mine),
            "paired_ratio_median": median(paired),
            "decode_tok_s_paired_ratio_median": median(
                [ratio(r["decode_tok_s"], ref_rate[r["round"]]) for r in mine if r["round"] in ref_rate]
            ),
            "paired_ratios": paired,
            "phases_median_s": {
                k: median([r["phases_s"][k] for r in mine if "phases_s" in r])
                for k in ("placement_and_spawn", "engine_boot", "ready_to_first_token")
            },
            "vllm_phases_median_s": phases_median(mine),
        }
    return out


def phases_median(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    keys = ("imports_and_processes", "model_init", "weights", "engine_init")
    return {k: median([r["vllm_phases_s"][k] for r in runs if "vllm_phases_s" in r]) for k in keys}


if __name__ == "__main__":
    main()
