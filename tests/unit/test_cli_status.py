"""`svllm status`: the tables and the JSON document drawn from a fleet status, and the sentence (not a traceback)
when the router cannot be reached, refuses the key or is not a serverless-vllm router. The router is a stand-in
(http.server) that answers a fixed `GET /status` and records the Authorization header it was sent."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from serverless_vllm import cli
from serverless_vllm.cli_status import model_row, render, status_document, table
from serverless_vllm.schemas import (
    EngineArgs,
    EngineStatus,
    FleetStatus,
    ModelInfo,
    ModelPolicy,
    ModelState,
    ModelTask,
    ReplicaInfo,
    ReplicaState,
    WorkerInfo,
    WorkerState,
)
from serverless_vllm.testing.ports import free_port

from .fleet import gpu


def _model(alias: str, state: ModelState, target: int, replicas: list[ReplicaInfo], **kw: Any) -> ModelInfo:
    return ModelInfo(
        alias=alias,
        model_name=f"org/{alias}",
        state=state,
        engine=EngineArgs(task=kw.pop("task", ModelTask.GENERATE)),
        policy=ModelPolicy(),
        desired_replicas=target,
        replicas=replicas,
        created_at=0.0,
        **kw,
    )


def _engine(rid: str, alias: str, state: ReplicaState) -> EngineStatus:
    return EngineStatus(replica_id=rid, alias=alias, state=state)


FLEET = FleetStatus(
    models=[
        _model(
            "qwen",
            ModelState.READY,
            2,
            [
                ReplicaInfo(replica_id="qwen-1", worker_id="gpu-a", gpus=[0, 1], state=ReplicaState.READY),
                ReplicaInfo(replica_id="qwen-2", worker_id="cpu-b", state=ReplicaState.STARTING),
            ],
        ),
        _model("embed", ModelState.COLD, 0, [], task=ModelTask.EMBED),
        _model("broken", ModelState.FAILED, 0, [], last_error="engine exited with 1\nOSError: no such model"),
    ],
    workers=[
        WorkerInfo(
            worker_id="gpu-a",
            url="http://10.0.0.1:7000",
            state=WorkerState.HEALTHY,
            gpus=[gpu(0), gpu(1)],
            cpu_slots=0,
            sleep_supported=True,
            heartbeat_age_s=1.234,
            engines=[_engine("qwen-1", "qwen", ReplicaState.READY)],
            foreign_memory_mb={0: 500, 1: 50_000},  # an idle GPU's driver share; another job's 50,000 MiB
        ),
        WorkerInfo(
            worker_id="cpu-b",
            url="http://10.0.0.2:7000",
            state=WorkerState.UNHEALTHY,
            gpus=[],
            cpu_slots=2,
            sleep_supported=False,
            heartbeat_age_s=300.0,
            engines=[_engine("qwen-2", "qwen", ReplicaState.STARTING)],
        ),
    ],
)

TABLES = """\
MODEL   TASK      STATE   READY  WHERE
broken  generate  failed  0/0    -
embed   embed     cold    0/0    -
qwen    generate  ready   1/2    gpu-a (gpu 0,1) ready, cpu-b (cpu) starting
broken failed: engine exited with 1

WORKER  HEALTH     HEARTBEAT  GPUS                                             ENGINES
cpu-b   unhealthy  5 min ago  cpu, 2 slots                                     qwen starting
gpu-a   healthy    1.2 s ago  2 x NVIDIA H100 (GiB used by others: gpu1 48.8)  qwen ready"""


def test_tables_are_aligned_and_say_what_runs_where() -> None:
    assert render(status_document(FLEET)) == TABLES


def test_an_adapter_is_ready_on_the_base_replicas_that_hold_it() -> None:
    holders = [
        ReplicaInfo(replica_id="qwen-1", worker_id="gpu-a", gpus=[0, 1], state=ReplicaState.READY),
        ReplicaInfo(replica_id="qwen-2", worker_id="cpu-b", state=ReplicaState.STARTING),
    ]
    adapter = _model("qwen-sql", ModelState.READY, 0, holders, base="qwen")  # an adapter's desired replicas: 0
    assert (model_row(adapter)["ready"], model_row(adapter)["target"]) == (1, 2)


def test_table_pads_every_column_but_the_last() -> None:
    assert table(("A", "BB"), [("xyz", "1"), ("q", "22222")]) == "A    BB\nxyz  1\nq    22222"


def test_an_empty_fleet_says_what_to_do() -> None:
    out = render(status_document(FleetStatus(models=[], workers=[])))
    assert out == "no models registered (svllm register)\n\nno workers registered (svllm worker --manager-url ...)"


def test_json_document_has_the_rows_of_the_tables() -> None:
    doc = status_document(FLEET)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON values only
    assert [m["alias"] for m in doc["models"]] == ["broken", "embed", "qwen"]
    qwen = doc["models"][2]
    assert qwen == {
        "alias": "qwen",
        "model_name": "org/qwen",
        "task": "generate",
        "state": "ready",
        "ready": 1,
        "target": 2,
        "replicas": [
            {"replica_id": "qwen-1", "worker_id": "gpu-a", "gpus": [0, 1], "state": "ready"},
            {"replica_id": "qwen-2", "worker_id": "cpu-b", "gpus": [], "state": "starting"},
        ],
        "error": None,
    }
    assert doc["models"][0]["error"].startswith("engine exited with 1")
    assert [w["worker_id"] for w in doc["workers"]] == ["cpu-b", "gpu-a"]
    gpu_a = doc["workers"][1]
    assert gpu_a["state"] == "healthy" and gpu_a["heartbeat_age_s"] == 1.2 and len(gpu_a["gpus"]) == 2
    assert [g["memory_foreign_mb"] for g in gpu_a["gpus"]] == [500, 50_000]
    assert gpu_a["engines"] == [{"replica_id": "qwen-1", "alias": "qwen", "state": "ready"}]


# --------------------------------------------------------------------------- through a stand-in router


@pytest.fixture
def router() -> Iterator[tuple[str, dict[str, Any]]]:
    """Answers every GET, POST and DELETE with `answer["status"]` and `answer["body"]`; records the Authorization
    header seen."""
    answer: dict[str, Any] = {"status": 200, "body": FLEET.model_dump_json().encode(), "auth": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            answer["auth"].append((self.path, self.headers.get("Authorization")))
            body = answer["body"]
            self.send_response(answer["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))  # the whole request read before answering
            self.do_GET()

        do_DELETE = do_POST

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def admin_key(monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("SVLLM_API_KEYS", "SVLLM_API_KEYS_FILE", "SVLLM_WORKER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SVLLM_AUTH", "on")
    monkeypatch.setenv("SVLLM_ADMIN_KEY", "the-admin-key")
    return "the-admin-key"


def test_status_command_prints_tables_or_json(
    router: tuple[str, dict[str, Any]], admin_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url, answer = router
    cli.main(["status", "--url", url])
    assert capsys.readouterr().out == TABLES + "\n"
    cli.main(["status", "--url", url + "/", "--json"])
    assert json.loads(capsys.readouterr().out) == status_document(FLEET)
    assert answer["auth"] == [("/status", f"Bearer {admin_key}")] * 2  # the admin key, as `svllm register` sends it


def test_router_url_from_the_environment(
    router: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUTER_URL", router[0])
    cli.main(["status"])
    assert capsys.readouterr().out == TABLES + "\n"


def _refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert isinstance(exit_.value.code, str), exit_.value.code  # a sentence, printed on stderr with status 1
    return exit_.value.code


def test_refused_key_is_a_sentence(router: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, answer = router
    answer["status"], answer["body"] = 401, b'{"error": {"message": "invalid credentials"}}'
    monkeypatch.setenv("SVLLM_AUTH", "on")
    monkeypatch.delenv("SVLLM_ADMIN_KEY", raising=False)
    assert _refusal(["status", "--url", url]) == (
        f"svllm status: the router at {url} refused the credentials (401): set SVLLM_ADMIN_KEY to the router's "
        "admin key"
    )
    monkeypatch.setenv("SVLLM_ADMIN_KEY", "wrong")
    assert _refusal(["status", "--url", url]).endswith("refused the credentials (401): check SVLLM_ADMIN_KEY")


def test_other_answers_are_sentences(router: tuple[str, dict[str, Any]]) -> None:
    url, answer = router
    answer["status"], answer["body"] = 404, b'{"detail": "Not Found"}'
    assert "has no GET /status" in _refusal(["status", "--url", url])
    answer["status"], answer["body"] = 503, b'{"error": {"message": "manager unreachable: ConnectError"}}'
    assert _refusal(["status", "--url", url]) == (
        f"svllm status: the router at {url} answered 503: manager unreachable: ConnectError"
    )
    answer["status"], answer["body"] = 200, b'{"hello": "world"}'
    assert "did not answer with a fleet status" in _refusal(["status", "--url", url])


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["keys", "list"],
        ["keys", "create", "--name", "k", "--tenant", "t"],
        ["register", "--model", "m"],
        ["patch", "m", "--max-replicas", "2"],
        ["delete", "m"],
    ],
)
def test_unreachable_router_is_a_sentence(command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    message = _refusal([*command, "--url", url])
    assert message.startswith(f"svllm {command[0]}: cannot reach the router at {url} (ConnectError"), message
    assert message.endswith("is it running? (--url or ROUTER_URL names it)")


def test_the_command_runs_as_a_module() -> None:
    """`python -m serverless_vllm.cli` (how scripts/gpu_check.py runs the services without an installed `svllm`)."""
    done = subprocess.run(
        [sys.executable, "-m", "serverless_vllm.cli", "status", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: svllm status"), done.stdout + done.stderr


def test_a_refused_command_says_the_routers_code_and_message_not_its_json(router: tuple[str, dict[str, Any]]) -> None:
    url, answer = router
    answer["status"] = 400
    answer["body"] = (
        b'{"error": {"message": "unknown model(s) nope: a key names registered aliases or glob patterns", '
        b'"type": "invalid_request_error", "param": null, "code": "unknown_model"}}'
    )
    assert _refusal(["keys", "create", "--name", "k", "--tenant", "t", "--model", "nope", "--url", url]) == (
        "svllm keys create failed (400 unknown_model): unknown model(s) nope: a key names registered aliases or glob "
        "patterns"
    )
    answer["status"], answer["body"] = 409, b'{"error": {"message": "alias \'m\' exists", "code": "alias_exists"}}'
    assert (
        _refusal(["register", "--model", "m", "--url", url])
        == "registration failed (409 alias_exists): alias 'm' exists"
    )
    answer["status"], answer["body"] = 502, b"Bad Gateway"  # not ours: a proxy in between
    assert _refusal(["keys", "revoke", "k", "--url", url]) == "svllm keys revoke failed (502): Bad Gateway"
