"""`svllm up`: the all-in-one local mode of the README's quick start serves a real engine; what its operator
reads (its log, `svllm status`) over a stand-in engine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import openai

from .harness import VENV_BIN, Service, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
# An instant stand-in for vLLM's OpenAI server (first on the engine's PYTHONPATH, so the worker's usual engine
# command runs it): the control plane's logs and status without a real engine start.
FAKE_VLLM = ROOT / "bench" / "fake_vllm"


def test_up_serves_a_chat_completion(tmp_path: Path, tiny_model: Path) -> None:
    port, manager_port, worker_port = free_port(), free_port(), free_port()
    up = Service(
        "up",
        [
            "up",
            "--port",
            str(port),
            "--manager-port",
            str(manager_port),
            "--worker-port",
            str(worker_port),
            "--state-dir",
            str(tmp_path / "state"),
            "--model",
            str(tiny_model),
            "--alias",
            "tiny",
            "--max-model-len",
            "2048",
        ],
        port,
        {"ENGINE_EXTRA_ARGS": "--enforce-eager", "HF_HUB_OFFLINE": "1"},
        tmp_path,
    )
    up.start(timeout=90)
    try:
        client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=60)
        wait_until(
            lambda: client.models.retrieve("tiny").model_extra["state"] == "ready", 240, interval=1, what="tiny ready"
        )
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert chat.choices[0].message.content is not None
        assert (tmp_path / "state" / "manager.db").exists()

        # SIGTERM (as Ctrl-C) with a stream in flight: it ends whole, then the process exits. Long enough to outlast
        # uvicorn's own 5 s of grace, which would cut it without the worker's drain.
        stream = client.completions.create(
            model="tiny",
            prompt="Once upon a time",
            max_tokens=2000,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        completion_tokens = None
        for chunk in stream:
            if up.proc is not None and up.proc.poll() is None and completion_tokens is None:
                up.signal(signal.SIGTERM)
                completion_tokens = 0
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
        assert completion_tokens == 2000
        assert up.proc is not None
        up.proc.wait(60)  # and then it stops (no hang)
    finally:
        up.stop()


KEYS = {"SVLLM_API_KEYS": "client-key", "SVLLM_ADMIN_KEY": "admin-key", "SVLLM_WORKER_TOKEN": "worker-token"}


def status(url: str, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SVLLM_")}
    return subprocess.run(
        [str(VENV_BIN / "svllm"), "status", "--url", url, *flags],
        env={**keep, "SVLLM_AUTH": "on", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_up_log_tells_the_start_and_status_shows_the_fleet(tmp_path: Path) -> None:
    """`svllm up` at INFO, credentials on, a stand-in engine: the log tells the start in phases and carries no
    line per heartbeat; `svllm status` shows the model ready where it runs, as tables and as JSON, and refuses
    politely without the admin key."""
    port, manager_port, worker_port = free_port(), free_port(), free_port()
    pythonpath = os.pathsep.join(p for p in (str(FAKE_VLLM), os.environ.get("PYTHONPATH")) if p)
    (tmp_path / "stand-in-model").mkdir()  # what the stand-in "loads": a folder the worker has
    up = Service(
        "up",
        [
            "up",
            "--port",
            str(port),
            "--manager-port",
            str(manager_port),
            "--worker-port",
            str(worker_port),
            "--state-dir",
            str(tmp_path / "state"),
            "--model",
            str(tmp_path / "stand-in-model"),
            "--alias",
            "tiny",
        ],
        port,
        {**KEYS, "SVLLM_AUTH": "on", "PYTHONPATH": pythonpath, "LOG_LEVEL": "info"},
        tmp_path,
    )
    up.start(timeout=60)
    try:

        def ready() -> dict[str, Any] | None:
            done = status(up.url, "--json", SVLLM_ADMIN_KEY="admin-key")
            assert done.returncode == 0, done.stderr
            doc: dict[str, Any] = json.loads(done.stdout)
            models = {m["alias"]: m for m in doc["models"]}
            return doc if models["tiny"]["state"] == "ready" and models["tiny"]["ready"] == 1 else None

        doc = wait_until(ready, 60, interval=0.5, what="tiny ready in svllm status --json")
        (model,) = doc["models"]
        (worker,) = doc["workers"]
        assert model["target"] == 1 and model["task"] == "generate"
        assert model["replicas"][0]["worker_id"] == worker["worker_id"] and worker["state"] == "healthy"
        assert [e["alias"] for e in worker["engines"]] == ["tiny"]

        shown = status(up.url, SVLLM_ADMIN_KEY="admin-key")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert re.fullmatch(r"MODEL +TASK +STATE +READY +WHERE", lines[0]), shown.stdout
        rid, wid = model["replicas"][0]["replica_id"], worker["worker_id"]
        assert re.fullmatch(rf"tiny +generate +ready +1/1 +{re.escape(wid)} \(cpu\) ready", lines[1]), shown.stdout
        assert lines[2] == "" and re.fullmatch(r"WORKER +HEALTH +HEARTBEAT +GPUS +ENGINES", lines[3]), shown.stdout
        assert re.fullmatch(rf"{re.escape(wid)} +healthy +[0-9.]+ s ago +cpu, \d+ slots? +tiny ready", lines[4]), (
            shown.stdout
        )

        for env, hint in (
            ({}, "set SVLLM_ADMIN_KEY to the router's admin key"),
            ({"SVLLM_ADMIN_KEY": "client-key"}, "check SVLLM_ADMIN_KEY"),  # a client key is not the admin key
        ):
            refused = status(up.url, **env)
            assert refused.returncode == 1 and refused.stdout == "", refused
            assert refused.stderr == f"svllm status: the router at {up.url} refused the credentials (401): {hint}\n"

        time.sleep(7)  # three more heartbeats (`svllm up` beats every 2 s) and long-polls
        log = up.log_path.read_text()
        assert "workers/heartbeat" not in log and "HTTP Request:" not in log, log
        assert "manager unreachable" not in log, log  # the manager listens before the worker registers
        assert f"model 'tiny' replica {rid} on worker {wid}: placed (cpu)" in log, log
        assert re.search(rf"model 'tiny' replica {rid} on worker {wid}: ready after \d+\.\d s", log), log
        assert f"(its log: {tmp_path / 'state' / 'engines' / rid}.log)" in log, log

        up.signal(signal.SIGINT)  # Ctrl-C: a quick, quiet stop (no long-poll held to the graceful timeout)
        assert up.proc is not None and up.proc.wait(20) == 130
        stopped = up.log_path.read_text()[len(log) :]
        assert "Traceback" not in stopped and "ERROR" not in stopped, stopped
    finally:
        up.stop()
    gone = status(up.url, SVLLM_ADMIN_KEY="admin-key")
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr
    assert gone.stderr.startswith(f"svllm status: cannot reach the router at {up.url} (ConnectError"), gone.stderr
