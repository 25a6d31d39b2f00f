"""Sleep levels through real processes (issue 18): manager, router and a worker process on a GPU machine's test
double (tests/gpu_worker.py: the real worker, NVML from tests/fake_nvml.py), whose engines are a stand-in with
vLLM's sleep mode (tests/sleep_engine: records every /sleep, /wake_up and /collective_rpc it receives).

Two models go idle on that worker: one whose weights fit in its host memory sleeps at level 1, one whose weights
do not (a sparse file larger than the machine's memory) at level 2; a request then wakes each, the level-2 one by
reloading its weights. No GPU is needed: vLLM's CPU build refuses sleep mode, so a real engine cannot take part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serverless_vllm.worker.host_memory import host_memory

from .harness import GPUWorkerDouble, Stack, free_port, wait_until

HERE = Path(__file__).resolve().parent
ENGINE_DOUBLE = HERE / "sleep_engine"


def model_folder(path: Path, weights_bytes: int) -> Path:
    """A model folder whose weights file has this size (sparse: it takes no disk)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(weights_bytes)
    return path


def calls(log: Path, model: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in c.items() if k != "model"} for c in lines if c["model"] == model]


def test_idle_models_sleep_at_the_level_their_worker_can_hold_and_wake(tmp_path: Path) -> None:
    log = tmp_path / "engine-calls.jsonl"
    small = model_folder(tmp_path / "small", 1 << 20)
    big = model_folder(tmp_path / "big", 4 * host_memory().total_bytes)  # can never fit 0.8 of available memory
    env = {"PYTHONPATH": str(ENGINE_DOUBLE), "SLEEP_DOUBLE_LOG": str(log), "ENGINE_FORK_SERVER": "0"}
    stack = Stack(tmp_path, env=env)
    port = free_port()
    args = ["--worker-id", "g1", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url]
    worker = GPUWorkerDouble("g1", args, port, stack.env, tmp_path)
    stack.workers["g1"] = worker
    try:
        stack.manager.start()
        stack.router.start()
        worker.start()
        registered = stack.get("/workers").json()
        assert registered[0]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3" and registered[0]["sleep_supported"]
        assert registered[0]["host_memory"]["total_bytes"] == host_memory().total_bytes
        for alias, folder in (("small", small), ("big", big)):
            body = {"alias": alias, "model_name": str(folder), "gpu_memory_utilization": 0.4, "idle_timeout_s": 15}
            resp = stack.post("/v1/models/register", json=body)
            assert resp.status_code == 200, resp.text
        # Both start (preload), go idle and are put to sleep: at the level their worker can hold. The manager says
        # `sleeping` as it sends the order (the replica leaves routing first), so the engine's call comes after.
        for alias, level in (("small", 1), ("big", 2)):
            info = stack.wait_model(alias, "sleeping", timeout=90)
            assert [r["sleep_level"] for r in info["replicas"]] == [level], info
            wait_until(lambda a=alias: calls(log, a), 30, what=f"{alias}'s engine told to sleep")
            assert calls(log, alias) == [{"call": "sleep", "level": level}]

        # The worker's own account reaches the manager with its next heartbeat, after the engine's call.
        def engines() -> dict[str, dict[str, Any]]:
            return {e["alias"]: e for e in stack.workers_by_id()["g1"]["engines"]}

        def levels() -> tuple[int | None, int | None]:
            seen = engines()
            return seen["small"]["sleep_level"], seen["big"]["sleep_level"]

        wait_until(lambda: levels() == (1, 2), 30, what="the worker's heartbeat to report both levels")
        assert engines()["big"]["weights_bytes"] == 4 * host_memory().total_bytes
        assert engines()["small"]["weights_bytes"] == 1 << 20
        # A request wakes each one: level 1 with its memory back; level 2 by reloading its weights from disk, as
        # vLLM's own restore does (the double refuses to answer with discarded weights).
        client = stack.openai(timeout=60)
        for alias in ("small", "big"):
            chat = client.chat.completions.create(
                model=alias, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert chat.choices[0].message.content == "awake"
        # (Idle again for idle_timeout_s, each would sleep again: only the calls so far are looked at.)
        assert calls(log, "small")[1:2] == [{"call": "wake_up", "tags": []}]
        assert calls(log, "big")[1:4] == [
            {"call": "wake_up", "tags": ["weights"]},
            {"call": "collective_rpc", "method": "reload_weights"},
            {"call": "wake_up", "tags": ["kv_cache"]},
        ]
        for alias in ("small", "big"):
            assert [(r["state"], r["sleep_level"]) for r in stack.model(alias)["replicas"]] == [("ready", None)]
    finally:
        stack.stop()
