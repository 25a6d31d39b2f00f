"""LoRA adapters (issue 17): 20 adapters on one base engine against the same traffic over separate engines, each
serving one merged model (the tiny Llama with one adapter's weights added in): memory and requests per second.

One stack (manager, router, one worker with CPU_SLOTS engines, credentials on), the tiny Llama in float32 (vLLM's
CPU LoRA path), everything through the router, in this order:

  base       the LoRA-enabled base engine (max_loras 20), traffic to the base model itself (reference)
  lora_20    20 adapters (testing/tiny_lora.py, rank 8, a seed each) registered and loaded, traffic round-robin
             over the 20
  lora_n     the same, round-robin over the first N adapters only (like for like with `separate`)
  separate   the base deleted, N merged models registered, one engine each (N as many as fit: 20 engines of
             about 3 GB do not fit in this machine's memory), traffic round-robin over the N

Traffic: `--clients` concurrent clients, `--requests` non-streaming completions in all, each `--max-tokens` tokens
exactly (`ignore_eos`), greedy, one fixed prompt. Memory: RSS and PSS of each engine's process tree (the vLLM API
server and what it spawned), read after its traffic. PSS shares a page between the processes that map it, so the
PSS of N engines adds up to what they take together; RSS counts shared pages (libraries) once per engine. The
memory of 20 separate engines is the measured per-engine figure times 20: an extrapolation, not a measurement.
A merged model's greedy output is compared with its adapter's (the merge is peft's merge_and_unload for these
linear layers: W + lora_alpha / r * B @ A).

    .venv/bin/python bench/lora_fleet.py --quick
    .venv/bin/python bench/lora_fleet.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ENGINE_MODULE,
    Procs,
    Stack,
    auth_env,
    base_env,
    descendants,
    loadavg,
    log,
    pids_matching,
    result_header,
    summary,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)
from serverless_vllm.testing.tiny_lora import make_tiny_lora

BASE = "tiny"
ADAPTERS = 20
PROMPT = "Once upon a time"
GIB = 2**30


def merge(model: Path, adapter: Path, target: Path) -> Path:
    """The model with the adapter merged in, float32, as a model folder of its own."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, target, ignore=shutil.ignore_patterns("model.safetensors", ".*"))
    weights = {k: v.to(torch.float32) for k, v in load_file(str(model / "model.safetensors")).items()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            prefix = key.removesuffix(".lora_A.weight")
            b = lora[f"{prefix}.lora_B.weight"]
            weights[prefix.removeprefix("base_model.model.") + ".weight"] += scale * (b.float() @ a.float())
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def memory_mb(pids: set[int]) -> dict[str, float]:
    """RSS and PSS of these processes, summed (smaps_rollup)."""
    totals = {"rss_mb": 0.0, "pss_mb": 0.0}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue  # gone since listed
        for line in lines:
            field, _, rest = line.partition(":")
            if field in ("Rss", "Pss"):
                totals[f"{field.lower()}_mb"] += int(rest.split()[0]) / 1024
    return {k: round(v, 1) for k, v in totals.items()}


def engines(marker: str) -> dict[str, dict[str, float]]:
    """Each engine of this run (its API server's command line names this run's directory): served name -> the
    memory of its process tree."""
    out = {}
    for pid in pids_matching(ENGINE_MODULE, marker):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "--served-model-name" in args:
            out[args[args.index("--served-model-name") + 1]] = memory_mb({pid, *descendants(pid)})
    return out


def complete(client: httpx.Client, model: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    resp = client.post("/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"{model}: {resp.status_code}: {resp.text[:500]}")
    out: dict[str, Any] = resp.json()
    if out["usage"]["completion_tokens"] != max_tokens:
        raise RuntimeError(f"{model}: {out['usage']} (asked for {max_tokens} tokens)")
    return out


def drive(url: str, headers: dict[str, str], models: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """`a.requests` completions round-robin over `models` from `a.clients` threads; requests per second."""
    order = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
            while (i := next(order)) < a.requests:
                t0 = time.perf_counter()
                try:
                    complete(client, models[i % len(models)], a.max_tokens)
                except (RuntimeError, httpx.HTTPError) as e:
                    with lock:
                        errors.append(str(e)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client_loop) for _ in range(a.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return {
        "models": len(models),
        "requests": a.requests,
        "wall_s": round(wall, 2),
        "rps": round(a.requests / wall, 2),
        "latency_ms": summary(latencies, 1000, 1),
        "loadavg_after": loadavg(),
    }


def fitting_engines(wanted: int, per_engine_mb: float, margin_gib: float = 4.0) -> tuple[int, float]:
    """How many more engines of about `per_engine_mb` the memory available now holds, keeping a margin."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024 / GIB
            return max(1, min(wanted, int((avail - margin_gib) * 1024 // per_engine_mb))), round(avail, 1)
    return 1, 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 separate engines, 40 requests a phase")
    p.add_argument("--engines", type=int, help="separate engines at most (default 3, --quick 2)")
    p.add_argument("--requests", type=int, help="requests a phase (default 240, --quick 40)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each request generates (default 16)")
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, --quick 0)")
    a = p.parse_args()
    a.engines = a.engines or (2 if a.quick else 3)
    a.requests = a.requests or (40 if a.quick else 240)
    procs = Procs("lorafleet")
    auth, client_key = auth_env()
    admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
    client = {"authorization": f"Bearer {client_key}"}
    lora_args = {"enable_lora": True, "max_loras": ADAPTERS, "max_lora_rank": 8}
    spec = {"alias": BASE, "max_model_len": 512, "dtype": "float32", "min_replicas": 1, **lora_args}
    result: dict[str, Any] = {
        **result_header("lora_fleet"),
        "settings": {
            "adapters": ADAPTERS,
            "adapter": "rank 8, q_proj and v_proj, 2 layers (29 KB)",
            "base": spec,
            "engines_at_most": a.engines,
            "requests_per_phase": a.requests,
            "clients": a.clients,
            "max_tokens": a.max_tokens,
        },
    }
    marker = str(procs.tmp)
    try:
        model = tiny_model(procs.tmp)
        names = [f"ad{i:02d}" for i in range(ADAPTERS)]
        paths = [make_tiny_lora(procs.tmp / "adapters" / n, seed=300 + i) for i, n in enumerate(names)]
        env = {**base_env(procs.tmp), **auth, "CPU_SLOTS": str(a.engines), "STANDBY_ENGINES": "0"}
        stack = Stack(procs, "lorafleet", env)
        api = httpx.Client(base_url=stack.url, headers=client, timeout=300)
        ops = httpx.Client(base_url=stack.url, headers=admin, timeout=60)
        ops.post("/v1/models/register", json={**spec, "model_name": str(model)}).raise_for_status()
        log("waiting for the base engine (not timed)")
        complete(api, BASE, a.max_tokens)
        wait = a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400)
        result["quiet"] = wait_for_quiet(wait, own_marker=marker)
        memory: dict[str, Any] = {"base_engine_no_adapter": engines(marker)[BASE]}
        for name, path in zip(names, paths, strict=True):
            ops.post(
                "/v1/models/register", json={"alias": name, "base": BASE, "adapter": str(path), "preload": False}
            ).raise_for_status()
        lora_text = {n: complete(api, n, a.max_tokens)["choices"][0]["text"] for n in names}  # loads all 20
        [replica] = ops.get(f"/v1/models/{BASE}").json()["replicas"]
        if len(replica["adapters"]) != ADAPTERS:
            raise RuntimeError(f"the base's replica holds {replica['adapters']}, not the {ADAPTERS} adapters")
        phases: dict[str, Any] = {}
        for phase, models in (("base", [BASE]), ("lora_20", names), ("lora_n", names[: a.engines])):
            log(f"{phase}: {a.requests} requests over {len(models)} model(s)")
            phases[phase] = drive(stack.url, client, models, a)
            log(f"{phase}: {phases[phase]['rps']} requests/s")
        memory["base_engine_20_adapters"] = engines(marker)[BASE]
        ops.delete(f"/v1/models/{BASE}", params={"cascade": "true"}).raise_for_status()
        wait_until(lambda: not engines(marker), 120, what="the base engine stopped")
        n, avail = fitting_engines(a.engines, memory["base_engine_20_adapters"]["rss_mb"])
        result["separate_engines"] = {"asked": a.engines, "started": n, "mem_available_gib_before": avail}
        merged = [f"{name}-merged" for name in names[:n]]
        for name, path, alias in zip(names, paths, merged, strict=False):
            folder = merge(model, path, procs.tmp / "merged" / name)
            reg = {"alias": alias, "model_name": str(folder), "max_model_len": 512, "dtype": "float32"}
            ops.post("/v1/models/register", json={**reg, "min_replicas": 1}).raise_for_status()
        log(f"waiting for {n} engines of merged models (not timed)")
        merged_text = {m: complete(api, m, a.max_tokens)["choices"][0]["text"] for m in merged}
        result["merged_output_equals_adapter"] = {
            name: merged_text[f"{name}-merged"] == lora_text[name] for name in names[:n]
        }
        log(f"separate: {a.requests} requests over {n} engines")
        phases["separate"] = drive(stack.url, client, merged, a)
        log(f"separate: {phases['separate']['rps']} requests/s")
        memory["separate_engines"] = engines(marker)
        per_engine = {
            k: round(sum(e[k] for e in memory["separate_engines"].values()) / n, 1) for k in ("rss_mb", "pss_mb")
        }
        result["phases"] = phases
        result["memory"] = memory
        result["summary"] = {
            "rps": {phase: phases[phase]["rps"] for phase in phases},
            "one_engine_20_adapters_mb": memory["base_engine_20_adapters"],
            "separate_per_engine_mb": per_engine,
            "separate_20_engines_mb_extrapolated": {k: round(v * ADAPTERS, 1) for k, v in per_engine.items()},
        }
        result["loadavg_end"] = loadavg()
        log(f"summary: {result['summary']}")
        write_result("lora_fleet_quick" if a.quick else "lora_fleet", result)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
