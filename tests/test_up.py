"""`svllm up`: the all-in-one local mode of the README's quick start serves a real engine."""

from __future__ import annotations

from pathlib import Path

import openai

from .harness import Service, free_port, wait_until


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
            "512",
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
    finally:
        up.stop()
