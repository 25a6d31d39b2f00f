"""What `svllm up`, `svllm register` and the appliance's `init` service register: the bodies they send, no engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from serverless_vllm import cli
from serverless_vllm.schemas import ModelSpec
from serverless_vllm.testing import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def up_args(*argv: str) -> Any:
    return cli.build_parser().parse_args(["up", *argv])


def test_up_registers_the_chat_model_only_by_default(tmp_path: Path) -> None:
    assert cli.up_registrations(up_args("--state-dir", str(tmp_path))) == []
    bodies = cli.up_registrations(up_args("--model", "/m/qwen/", "--max-model-len", "512", "--engine-arg=-x"))
    assert bodies == [{"alias": "qwen", "model_name": "/m/qwen/", "max_model_len": 512, "extra_args": ["-x"]}]


def test_up_registers_an_embedding_model_beside_it(tmp_path: Path) -> None:
    args = up_args("--model", "org/chat", "--alias", "chat", "--embed-model", "org/bge", "--max-model-len", "64")
    assert cli.up_registrations(args) == [
        {"alias": "chat", "model_name": "org/chat", "max_model_len": 64},
        {"alias": "embed", "model_name": "org/bge", "task": "embed"},  # --max-model-len is the chat model's
    ]
    bodies = cli.up_registrations(
        up_args("--embed-model", "tiny", "--embed-alias", "vec", "--state-dir", str(tmp_path))
    )
    tiny = str(tmp_path.resolve() / "models" / "tiny")  # where scripts/up.sh writes the chat model's tiny model
    assert bodies == [{"alias": "vec", "model_name": tiny, "task": "embed", "max_model_len": 512}]
    for body in cli.up_registrations(args) + bodies:
        ModelSpec.model_validate(body)  # what the router accepts


def test_up_refuses_one_alias_for_both_models() -> None:
    with pytest.raises(SystemExit, match="--embed-alias"):
        cli.up_registrations(up_args("--model", "org/a", "--alias", "embed", "--embed-model", "org/b"))


def test_up_makes_the_tiny_model_and_registers_both_once_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[dict[str, object]] = []
    made: list[str] = []

    async def serve() -> None:
        return None

    async def register(url: str, body: dict[str, object], auth: Any = None) -> dict[str, object]:
        sent.append(body)
        return {**body, "engine": {"task": body.get("task", "generate")}, "state": "loading"}

    monkeypatch.setattr(cli, "_server", lambda *a, **kw: SimpleNamespace(started=True, serve=serve))
    for name in ("manager_app", "router_app", "worker_app"):
        # a worker's app has its drain hook in its state
        monkeypatch.setattr(cli, name, lambda settings, auth=None: SimpleNamespace(state=SimpleNamespace(leave=None)))
    monkeypatch.setattr(cli, "register_model", register)
    monkeypatch.setattr(cli, "_run", asyncio.run)
    monkeypatch.setattr(tiny_model, "make_tiny_model", lambda path: made.append(str(path)))
    monkeypatch.setenv("SVLLM_AUTH", "off")
    caplog.set_level("INFO", logger="svllm")
    cli.main(["up", "--state-dir", str(tmp_path), "--model", "org/chat", "--embed-model", "tiny"])
    tiny = str(tmp_path.resolve() / "models" / "tiny")
    assert made == [tiny]
    assert [(b["alias"], b["model_name"], b.get("task")) for b in sent] == [
        ("chat", "org/chat", None),
        ("embed", tiny, "embed"),
    ]
    assert {"registered chat -> org/chat", f"registered embed -> {tiny} (task embed)"} <= set(caplog.messages)


@pytest.mark.parametrize("task", ["generate", "embed", "classify"])
def test_register_sends_the_task(
    task: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[dict[str, object]] = []

    async def register(url: str, body: dict[str, object], auth: Any = None) -> dict[str, object]:
        sent.append(body)
        return {**body, "engine": {"task": task}, "state": "cold"}

    monkeypatch.setattr(cli, "register_model", register)
    cli.main(["register", "--url", "http://r:1", "--model", "org/m", "--task", task])
    assert sent == [{"alias": "m", "model_name": "org/m", **({} if task == "generate" else {"task": task})}]
    assert capsys.readouterr().out == (
        f"registered m -> org/m{'' if task == 'generate' else f' (task {task})'} (state: cold)\n"
    )
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["register", "--model", "m", "--task", "rank"])


# =========================================================================== docker/register_default_model.py


@pytest.fixture
def router() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in router: lists what was registered, records registrations with their Authorization header."""
    posted: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, data: object) -> None:
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self.reply({"data": [{"id": p["body"]["alias"]} for p in posted]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posted.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            self.reply({"alias": body["alias"]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posted
    finally:
        server.shutdown()
        server.server_close()


def init(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DEFAULT_", "SVLLM_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "register_default_model.py")],
        env={**keep, "ROUTER_URL": url, "INIT_TIMEOUT": "5", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_init_registers_the_default_and_the_embedding_model(router: tuple[str, list[dict[str, Any]]]) -> None:
    url, posted = router
    env = {"DEFAULT_MODEL": "org/chat", "DEFAULT_MAX_MODEL_LEN": "4096", "DEFAULT_EMBED_MODEL": "/models/bge"}
    done = init(url, SVLLM_ADMIN_KEY="admin", **env)
    assert done.returncode == 0, done.stderr
    assert posted == [
        {
            "path": "/v1/models/register",
            "body": {"alias": "default", "model_name": "org/chat", "max_model_len": 4096},
            "auth": "Bearer admin",
        },
        {
            "path": "/v1/models/register",
            "body": {"alias": "embed", "model_name": "/models/bge", "task": "embed"},
            "auth": "Bearer admin",
        },
    ]
    for p in posted:
        ModelSpec.model_validate(p["body"])
    again = init(url, **env)  # idempotent: both aliases are listed
    assert again.returncode == 0 and len(posted) == 2 and again.stdout.count("already registered") == 2


def test_init_embedding_model_alone_and_nothing(router: tuple[str, list[dict[str, Any]]]) -> None:
    url, posted = router
    assert init(url, DEFAULT_EMBED_MODEL="org/bge", DEFAULT_EMBED_ALIAS="vec").returncode == 0
    assert [p["body"] for p in posted] == [{"alias": "vec", "model_name": "org/bge", "task": "embed"}]
    nothing = init(url)
    assert nothing.returncode == 0 and "nothing to register" in nothing.stdout
    clash = init(url, DEFAULT_MODEL="a", DEFAULT_ALIAS="x", DEFAULT_EMBED_MODEL="b", DEFAULT_EMBED_ALIAS="x")
    assert clash.returncode == 1 and "must differ" in clash.stderr and len(posted) == 1
