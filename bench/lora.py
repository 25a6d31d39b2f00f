"""LoRA adapters (issue 17): the first request to an adapter no replica holds vs a request to one that is loaded,
time to first streamed token through the router, on one ready base engine.

  base      the base model itself (reference: the same engine, no adapter)
  unloaded  a freshly registered adapter: the router holds the request, the manager asks the base's replica to
            load it, the worker calls the engine's runtime adapter API, its heartbeat reports it, the route
            becomes ready and the request goes
  loaded    the same adapter again, now held by the engine

A stack (manager, router, one worker, credentials on) serves the tiny Llama in float32 with LoRA on, registered
and started before anything is timed. Each round registers a new adapter (testing/tiny_lora.py, a seed of its
own) and times base, unloaded, loaded in that order; the summary is the median over rounds of each kind and of
`unloaded - loaded` (what loading adds). The issue's goal: under 1 s for a tiny adapter on CPU, against the ~30 s
of starting an engine for a merged model (docs/benchmarks.md, cold starts).

    .venv/bin/python bench/lora.py --quick
    .venv/bin/python bench/lora.py
"""

from __future__ import annotations

import argparse
import sys
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
    log,
    median,
    result_header,
    summary,
    tiny_model,
    wait_for_quiet,
    write_result,
)
from serverless_vllm.testing.tiny_lora import make_tiny_lora

BASE = "tiny"


def ttft(url: str, model: str, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed completion to its first token event."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=300) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{model}: {resp.status_code}: {resp.read()[:500]!r}")
        for line in resp.iter_lines():  # read to the end
            if first is None and line.startswith("data: ") and '"choices"' in line:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{model}: stream ended without a token")
    return first - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds")
    p.add_argument("--rounds", type=int, help="rounds (default 10, --quick 3)")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, --quick 0)")
    a = p.parse_args()
    rounds = a.rounds or (3 if a.quick else 10)
    procs = Procs("lora")
    auth, client_key = auth_env()
    admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
    client = {"authorization": f"Bearer {client_key}"}
    spec = {
        "alias": BASE,
        "max_model_len": 512,
        "dtype": "float32",
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 8,
        "min_replicas": 1,
    }
    result: dict[str, Any] = {
        **result_header("lora"),
        "settings": {"rounds": rounds, "base": spec, "adapter": "rank 8, q_proj and v_proj, 2 layers (29 KB)"},
    }
    runs: list[dict[str, float]] = []
    try:
        model = tiny_model(procs.tmp)
        env = {**base_env(procs.tmp), **auth, "CPU_SLOTS": "1", "STANDBY_ENGINES": "0"}
        stack = Stack(procs, "lora", env)
        body = {**spec, "model_name": str(model)}
        httpx.post(f"{stack.url}/v1/models/register", json=body, headers=admin, timeout=60).raise_for_status()
        log("waiting for the base engine (not timed)")
        ttft(stack.url, BASE, client)
        wait = a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400)
        result["quiet"] = wait_for_quiet(wait, own_marker=str(procs.tmp))
        for r in range(rounds):
            alias = f"ad{r}"
            path = make_tiny_lora(procs.tmp / "adapters" / alias, seed=100 + r)
            reg = {"alias": alias, "base": BASE, "adapter": str(path), "preload": False}  # loaded by requests
            httpx.post(f"{stack.url}/v1/models/register", json=reg, headers=admin, timeout=60).raise_for_status()
            run = {"base": ttft(stack.url, BASE, client)}
            run["unloaded"] = ttft(stack.url, alias, client)
            run["loaded"] = ttft(stack.url, alias, client)
            runs.append(run)
            log(f"round {r + 1}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in run.items()))
        result["runs"] = runs
        result["summary"] = {
            **{kind: summary((run[kind] for run in runs), 1000, 1) for kind in ("base", "unloaded", "loaded")},
            "load_adds_ms_median": round((median(r["unloaded"] - r["loaded"] for r in runs) or 0) * 1000, 1),
        }
        log(f"summary: {result['summary']}")
        write_result("lora_quick" if a.quick else "lora", result)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
