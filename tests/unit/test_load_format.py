"""The weight loader of a registration (`load_format`, issue 18): validated at registration, refused as an extra
argument, on the engine's command line, and set by `svllm register` and `svllm up`. That vLLM's own parser takes
the command line: tests/test_engine.py (it imports vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serverless_vllm import cli
from serverless_vllm.config import AuthSettings, ManagerSettings, WorkerSettings
from serverless_vllm.errors import APIError
from serverless_vllm.manager.http_app import create_app
from serverless_vllm.schemas import Assignment, EngineArgs, LoadFormat, ModelSpec
from serverless_vllm.security.models import check_engine_args
from serverless_vllm.worker.engine import EngineProcess

ALLOWED = ("auto", "safetensors", "runai_streamer", "fastsafetensors")


def test_the_four_loaders() -> None:
    assert tuple(f.value for f in LoadFormat) == ALLOWED
    assert ModelSpec(alias="a", model_name="org/a").load_format is LoadFormat.AUTO
    for value in ALLOWED:
        spec = ModelSpec.model_validate({"alias": "a", "model_name": "org/a", "load_format": value})
        assert spec.engine_args().load_format == value


def test_another_loader_is_a_400_that_lists_the_allowed_ones(tmp_path: Path) -> None:
    app = create_app(ManagerSettings(db_path=str(tmp_path / "m.db")), auth=AuthSettings(mode="off"))
    with TestClient(app) as client:
        for value in ("tensorizer", "dummy", "AUTO", "", 1):
            resp = client.post("/models", json={"alias": "a", "model_name": "org/a", "load_format": value})
            assert resp.status_code == 400, (value, resp.text)
            message = resp.json()["error"]["message"]
            assert "load_format" in message and all(f"'{v}'" in message for v in ALLOWED), message
        resp = client.post("/models", json={"alias": "a", "model_name": "org/a", "load_format": "runai_streamer"})
        assert resp.status_code == 200 and resp.json()["engine"]["load_format"] == "runai_streamer"


@pytest.mark.parametrize(
    "args", [["--load-format", "tensorizer"], ["--load-format=dummy"], ["--load_format", "pt"], ["--load-f", "x"]]
)
def test_extra_args_may_not_set_the_loader(args: list[str]) -> None:
    with pytest.raises(APIError) as err:
        check_engine_args(args)
    assert err.value.status == 400 and "--load" in err.value.message


def command(tmp_path: Path, load_format: str, has_gpu: bool = False) -> list[str]:
    a = Assignment(replica_id="r", alias="m", model_name="/m", engine=EngineArgs(load_format=LoadFormat(load_format)))
    settings = WorkerSettings.model_validate({"worker_id": "w", "log_dir": str(tmp_path)})
    return EngineProcess(a, settings, has_gpu=has_gpu).command(4000)


@pytest.mark.parametrize("has_gpu", [False, True])
def test_the_engine_command_names_the_loader(tmp_path: Path, has_gpu: bool) -> None:
    assert "--load-format" not in command(tmp_path, "auto", has_gpu)  # vLLM's default: nothing to say
    for value in ALLOWED[1:]:
        cmd = command(tmp_path, value, has_gpu)
        assert cmd.count("--load-format") == 1 and cmd[cmd.index("--load-format") + 1] == value


def sent_by(monkeypatch: pytest.MonkeyPatch, *argv: str) -> dict[str, Any]:
    sent: list[dict[str, Any]] = []

    async def register(url: str, body: dict[str, Any], auth: Any = None) -> dict[str, Any]:
        sent.append(body)
        return {"alias": body["alias"], "model_name": body.get("model_name", body.get("adapter")), "state": "loading"}

    monkeypatch.setattr(cli, "register_model", register)
    cli.main(["register", "--url", "http://r", *argv])
    return sent[0]


def test_svllm_register_takes_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    body = sent_by(monkeypatch, "--model", "org/a", "--load-format", "fastsafetensors")
    assert body == {"alias": "a", "model_name": "org/a", "load_format": "fastsafetensors"}
    assert "load_format" not in sent_by(monkeypatch, "--model", "org/a")  # the default is left to the manager
    ModelSpec.model_validate(body)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["register", "--model", "org/a", "--load-format", "tensorizer"])


def test_svllm_up_gives_it_to_the_chat_model() -> None:
    args = cli.build_parser().parse_args(
        ["up", "--model", "org/chat", "--load-format", "runai_streamer", "--embed-model", "org/bge"]
    )
    assert cli.up_registrations(args) == [
        {"alias": "chat", "model_name": "org/chat", "load_format": "runai_streamer"},
        {"alias": "embed", "model_name": "org/bge", "task": "embed"},
    ]


def test_svllm_register_takes_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli_policy.py: each flag given sets its ModelPolicy field; none given leaves them to the manager."""
    body = sent_by(
        monkeypatch, "--model", "org/a", "--min-replicas", "1", "--max-replicas", "3", "--idle-timeout", "60",
        "--target-concurrency", "2.5", "--routing", "least_loaded", "--no-preload",
    )  # fmt: skip
    assert body == {
        "alias": "a",
        "model_name": "org/a",
        "min_replicas": 1,
        "max_replicas": 3,
        "idle_timeout_s": 60.0,
        "target_concurrency": 2.5,
        "routing": "least_loaded",
        "preload": False,
    }
    policy = ModelSpec.model_validate(body).policy()
    assert (policy.min_replicas, policy.max_replicas, policy.preload, policy.routing) == (1, 3, False, "least_loaded")
    assert sent_by(monkeypatch, "--model", "org/a") == {"alias": "a", "model_name": "org/a"}
    assert sent_by(monkeypatch, "--model", "org/a", "--preload")["preload"] is True
    adapter = sent_by(monkeypatch, "--alias", "ad", "--base", "b", "--adapter", "org/ad", "--idle-timeout", "30")
    assert adapter == {"alias": "ad", "base": "b", "adapter": "org/ad", "idle_timeout_s": 30.0}
    ModelSpec.model_validate(adapter)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["register", "--model", "org/a", "--routing", "random"])
