"""Memory another process holds on a GPU, through real processes: manager, router and a worker on a GPU machine's
test double (tests/gpu_worker.py: the real worker, NVML from tests/fake_nvml.py, here with 50 GB of its H100 in use
by another process), whose engines are the stand-in of tests/sleep_engine (no GPU for vLLM here).

The worker's NVML readings reach the manager in its registration and heartbeats; a model that would not fit beside
the other process's memory is refused with the reason, one that fits then is placed and serves. (The stand-in
engine holds no GPU memory, so the double's NVML would not see it: the models are registered one at a time.)
"""

from __future__ import annotations

from pathlib import Path

from .harness import GPUWorkerDouble, Stack, free_port
from .test_sleep_levels import ENGINE_DOUBLE, model_folder

FOREIGN_MB = 50_000  # of the double's 81,559 MiB: 0.39 of the GPU left


def register(stack: Stack, alias: str, folder: Path, fraction: float) -> None:
    body = {"alias": alias, "model_name": str(folder), "gpu_memory_utilization": fraction}
    resp = stack.post("/v1/models/register", json=body)
    assert resp.status_code == 200, resp.text


def test_memory_another_process_holds_is_not_placed_on(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model", 1 << 20)
    stack = Stack(tmp_path, env={"PYTHONPATH": str(ENGINE_DOUBLE), "SLEEP_DOUBLE_LOG": str(tmp_path / "calls")})
    port = free_port()
    args = ["--worker-id", "g1", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url]
    worker = GPUWorkerDouble("g1", args, port, {**stack.env, "FAKE_GPU_FOREIGN_MB": str(FOREIGN_MB)}, tmp_path)
    stack.workers["g1"] = worker
    try:
        stack.manager.start()
        stack.router.start()
        worker.start()
        assert stack.workers_by_id()["g1"]["gpus"][0]["memory_free_mb"] == 81559 - FOREIGN_MB
        register(stack, "half", folder, 0.5)
        refused = stack.wait_model("half", "failed", timeout=60)
        assert f"gpu0: 0.39 ({FOREIGN_MB} MiB in use outside our engines)" in refused["last_error"], refused
        assert stack.workers_by_id()["g1"]["foreign_memory_mb"] == {"0": FOREIGN_MB}  # what operators see
        register(stack, "third", folder, 0.3)
        stack.wait_model("third", "ready", timeout=90)
        chat = stack.openai(timeout=60).chat.completions.create(
            model="third", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.content == "awake"
    finally:
        stack.stop()
