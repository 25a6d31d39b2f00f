"""The worker's GPU path on a real NVIDIA GPU: what the tests can only give a double of (tests/fake_nvml.py).

Run on a machine with a GPU and its driver (README, "Checked on a real GPU"); it needs no vLLM CUDA build, and
PyTorch for the last step. What it checks, and writes to `--out` as JSON:

1. probe     GPUProbe (worker/gpus.py) through the real pynvml reads what `nvidia-smi` reads: the same GPUs,
             names, UUIDs and memory.
2. double    tests/fake_nvml.py answers the calls GPUProbe makes with the types the real pynvml returns.
3. stack     manager, router and a real `svllm worker` on this GPU (its engine the sleep-mode stand-in of
             tests/sleep_engine: no vLLM): the worker registers the GPU as NVML reads it, a model is placed on
             it and its engine started with CUDA_VISIBLE_DEVICES naming it, a completion goes through, the
             worker exports svllm_gpu_* with the GPU's name, and 20 GiB taken on the GPU by another process
             (PyTorch) shows in the worker's next heartbeats as memory no longer free, and comes back when freed.

    python3 scripts/gpu_check.py --out /tmp/gpu_check.json
    python3 scripts/gpu_check.py --fake-gpu     # a rehearsal without a GPU: the stack part on the test double

Exits 1 if a check fails (each one's result is in the JSON either way).

Where the project's dependencies are not installed (a development session's device machine has PyTorch and
nvidia-ml-py, but no registry to install from), carry their wheels: here, `pip download --only-binary=:all:
--python-version 3.12 --platform manylinux2014_x86_64 --implementation cp --abi cp312 --abi none -d .device/wheels
fastapi==... starlette==... uvicorn==... uvicorn-worker==... httptools==... pydantic==... pydantic-core==...
pydantic-settings==... gunicorn==...` (the versions of the local .venv; `.device/` in .git/info/exclude); there,
`python3 -m pip install --no-index --no-deps --target /tmp/site .device/wheels/*.whl` and
`PYTHONPATH=/tmp/site python3 scripts/gpu_check.py --out $OUT/gpu_check.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "services")]

import httpx  # noqa: E402
import pynvml  # noqa: E402
from serverless_vllm.testing.ports import free_port  # noqa: E402
from serverless_vllm.worker.gpus import GPUProbe  # noqa: E402

from tests import harness  # noqa: E402
from tests.fake_nvml import FakeGPU, FakeNVML  # noqa: E402

SLEEP_ENGINE = ROOT / "tests" / "sleep_engine"
TAKEN_GIB = 20


def nvidia_smi() -> list[dict[str, Any]]:
    fields = "index,name,uuid,memory.total,memory.used,memory.free"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        index, name, uuid, total, used, free = (v.strip() for v in line.split(","))
        rows.append(
            {"index": int(index), "name": name, "uuid": uuid, "total_mb": int(total), "used_mb": int(used),
             "free_mb": int(free)}
        )  # fmt: skip
    return rows


def check_probe() -> dict[str, Any]:
    smi = nvidia_smi()
    probe = GPUProbe()
    gpus = [g.model_dump() for g in probe.detect()]
    sample = [g.model_dump() for g in probe.sample()]
    probe.close()
    assert len(gpus) == len(smi) > 0, (gpus, smi)
    for g, s in zip(gpus, smi, strict=True):
        assert (g["index"], g["name"], g["uuid"]) == (s["index"], s["name"], s["uuid"]), (g, s)
        # nvidia-smi's total leaves out what the driver reserves; NVML's v1 total counts it: within 1%.
        assert abs(g["memory_total_mb"] - s["total_mb"]) <= 0.01 * s["total_mb"], (g, s)
        assert abs(g["memory_free_mb"] - s["free_mb"]) <= 0.01 * s["total_mb"] + 1024, (g, s)
        assert 0.0 <= g["utilization_pct"] <= 100.0, g
    return {"nvidia_smi": smi, "detect": gpus, "sample": sample}


def check_double() -> dict[str, Any]:
    """The real pynvml's answers to GPUProbe's calls against the double's: the same types and fields."""
    pynvml.nvmlInit()
    fake = FakeNVML(gpus=[FakeGPU()])
    fake.nvmlInit()
    seen: dict[str, Any] = {}
    try:
        for nvml, who in ((pynvml, "real"), (fake, "double")):
            handle = nvml.nvmlDeviceGetHandleByIndex(0)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
            seen[who] = {
                "count": type(nvml.nvmlDeviceGetCount()).__name__,
                "name": type(nvml.nvmlDeviceGetName(handle)).__name__,
                "uuid": type(nvml.nvmlDeviceGetUUID(handle)).__name__,
                "memory": {f: type(getattr(memory, f)).__name__ for f in ("total", "free", "used")},
                "utilization_gpu": type(utilization.gpu).__name__,
            }
        seen["real_errors"] = pynvml.NVMLError.__module__
        seen["pynvml_version"] = _version("nvidia-ml-py")
        seen["driver"] = pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    assert seen["real"] == seen["double"], seen
    return seen


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def gpu_free_mb(stack: harness.Stack) -> int:
    return int(stack.workers_by_id()["g1"]["gpus"][0]["memory_free_mb"])


def check_stack(tmp: Path, fake_gpu: bool, results: dict[str, Any]) -> dict[str, Any]:
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(1 << 20)
    env = {
        "PYTHONPATH": os.pathsep.join([str(SLEEP_ENGINE), str(ROOT / "services"), os.environ.get("PYTHONPATH", "")]),
        "SLEEP_DOUBLE_LOG": str(tmp / "engine-calls.jsonl"),
        "ENGINE_FORK_SERVER": "0",
    }
    stack = harness.Stack(tmp, env=env)
    out: dict[str, Any] = {}
    try:
        stack.manager.start()
        stack.router.start()
        if fake_gpu:
            port = free_port()
            args = ["--worker-id", "g1", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url]
            stack.workers["g1"] = harness.GPUWorkerDouble("g1", args, port, stack.env, tmp).start()
        else:
            stack.add_worker("g1")
        worker = stack.workers_by_id()["g1"]
        out["registered_gpus"] = worker["gpus"]
        if not fake_gpu:  # as NVML read it a moment ago, in this process
            probe = results["probe"]["detect"]
            assert [(g["name"], g["uuid"], g["memory_total_mb"]) for g in worker["gpus"]] == [
                (g["name"], g["uuid"], g["memory_total_mb"]) for g in probe
            ], (worker["gpus"], probe)
        body = {"alias": "gpu-model", "model_name": str(model), "gpu_memory_utilization": 0.4, "min_replicas": 1}
        resp = stack.post("/v1/models/register", json=body)
        assert resp.status_code == 200, resp.text
        info = stack.wait_model("gpu-model", "ready", timeout=120)
        out["replicas"] = info["replicas"]
        assert [r["gpus"] for r in info["replicas"]] == [[0]], info
        engine = next(e for e in stack.workers_by_id()["g1"]["engines"] if e["alias"] == "gpu-model")
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{engine['pid']}/environ").read_text().split("\0") if "=" in item
        )
        out["engine_cuda_visible_devices"] = environ.get("CUDA_VISIBLE_DEVICES")
        assert out["engine_cuda_visible_devices"] == "0", out
        chat = httpx.post(
            f"{stack.router.url}/v1/chat/completions",
            json={"model": "gpu-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert chat.status_code == 200, chat.text
        out["completion"] = chat.json()["choices"][0]["message"]["content"]
        metrics = httpx.get(f"{stack.workers['g1'].url}/metrics", timeout=10).text
        out["worker_gpu_metrics"] = [line for line in metrics.splitlines() if line.startswith("svllm_gpu_")]
        name = worker["gpus"][0]["name"]
        assert any(f'gpu_name="{name}"' in line for line in out["worker_gpu_metrics"]), out["worker_gpu_metrics"]
        if not fake_gpu:
            out["gpu_memory_taken"] = take_gpu_memory(stack)
    except BaseException:
        services = [("manager", stack.manager), ("router", stack.router), *stack.workers.items()]
        results["stack_logs"] = {name: service.log(40) for name, service in services}
        raise
    finally:
        stack.stop()
    return out


def take_gpu_memory(stack: harness.Stack) -> dict[str, Any]:
    """Another process's allocation on the GPU shows in the worker's heartbeats (NVML sampled on each)."""
    import torch

    def settled(want: Callable[[int], bool], what: str) -> int:
        def reading() -> int | None:
            free = gpu_free_mb(stack)
            return free if want(free) else None

        return int(harness.wait_until(reading, 20, 0.25, what=what))

    before = gpu_free_mb(stack)
    taken = torch.empty(TAKEN_GIB << 30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    during = settled(lambda v: v <= before - TAKEN_GIB * 1024, f"{TAKEN_GIB} GiB less free in a heartbeat")
    del taken
    torch.cuda.empty_cache()
    after = settled(lambda v: v >= before - 2048, "the memory free again in a heartbeat")  # the CUDA context stays
    return {"free_mb_before": before, "free_mb_while_taken": during, "free_mb_after": after, "taken_gib": TAKEN_GIB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--fake-gpu", action="store_true", help="no GPU here: the stack part on tests/fake_nvml.py")
    a = p.parse_args()
    # The services run as `python -m serverless_vllm.cli` under this interpreter (no installed `svllm` needed).
    bin_dir = Path(tempfile.mkdtemp(prefix="svllm-bin-"))
    (bin_dir / "svllm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m serverless_vllm.cli "$@"\n')
    (bin_dir / "svllm").chmod(0o755)
    harness.VENV_BIN = bin_dir
    results: dict[str, Any] = {"python": sys.version, "fake_gpu": a.fake_gpu}
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if not a.fake_gpu:
        checks += [("probe", check_probe), ("double", check_double)]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    checks.append(("stack", lambda: check_stack(tmp, a.fake_gpu, results)))
    failed = []
    for name, check in checks:
        started = time.monotonic()
        try:
            results[name] = {"ok": True, **check()}
        except BaseException as exc:  # every check runs and is reported
            failed.append(name)
            results[name] = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"{name}: {'ok' if name not in failed else 'FAILED'} ({results[name]['seconds']} s)", flush=True)
    a.out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str)[:6000])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
