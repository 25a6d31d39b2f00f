"""End to end, plain-HTTP mode: manager, router and two workers as real processes serving a real CPU vLLM
engine on the tiny model, driven with the official openai client.

The tests of this module share one stack and run in file order, each building on the state the previous
one left (that is the story of a deployment: register, serve, fail, lose a worker, restart the manager).
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import openai
import pytest

from .harness import IdleConnection, Service, Stack, alive, descendants, engine_pids, free_port, wait_until

ALIAS = "tiny"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    # The worker's default fork server (the harness turns it off elsewhere): engines start forked from it.
    s = Stack(tmp_path_factory.mktemp("e2e-http"), env={"ENGINE_FORK_SERVER": "1"}).start(workers=2)
    yield s
    s.stop()


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return body["error"]


def test_workers_register(stack: Stack) -> None:
    workers = wait_until(lambda: (w := stack.workers_by_id()) and len(w) == 2 and w, 30, what="two workers")
    assert {w["state"] for w in workers.values()} == {"healthy"}
    assert all(w["gpus"] == [] and w["cpu_slots"] == 2 for w in workers.values())  # CPU-only machine


def test_register_and_serve(stack: Stack, tiny_model: Path) -> None:
    resp = stack.post("/v1/models/register", json={"alias": ALIAS, "model_name": str(tiny_model), "max_model_len": 512})
    assert resp.status_code == 200, resp.text
    assert resp.json()["alias"] == ALIAS
    info = stack.wait_model(ALIAS, "ready")
    assert len(info["replicas"]) == 1 and info["replicas"][0]["state"] == "ready"
    # Forked by the worker's fork server, as by default (the one engine of this module's stack).
    forked = [w for w in stack.workers.values() if "forked pid" in w.log(100000)]
    assert len(forked) == 1, [w.log(20) for w in stack.workers.values()]


def test_chat_and_completion(stack: Stack) -> None:
    client = stack.openai()
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert chat.model == ALIAS and chat.choices[0].message.content is not None
    assert chat.usage.completion_tokens > 0
    text = client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text is not None and text.usage.completion_tokens > 0


def test_streaming_chat_and_completion(stack: Stack) -> None:
    client = stack.openai()
    chunks = list(
        client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
    )
    assert len(chunks) >= 2  # streamed chunk by chunk, not one buffered answer
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    pieces = list(client.completions.create(model=ALIAS, prompt="abc", max_tokens=8, stream=True))
    assert len(pieces) >= 2 and all(p.model == ALIAS for p in pieces)


def test_models_list(stack: Stack) -> None:
    models = stack.openai().models.list()
    assert ALIAS in [m.id for m in models.data]


def test_router_scales_out_to_several_processes(stack: Stack) -> None:
    """`svllm router --workers 2`: gunicorn processes, each with its own table, on one port, serving with the
    services' protocol and its client timeout (CLIENT_TIMEOUT, here 1 s: a head left unfinished is answered 408)."""
    port = free_port()
    router = Service(
        "router-x2",
        ["router", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url, "--workers", "2"],
        port,
        {**stack.env, "CLIENT_TIMEOUT": "1"},
        stack.tmp,
    )
    router.start()
    try:
        idle = IdleConnection(port)  # gunicorn's own keep-alive (2 s) would close it: KEEP_ALIVE_TIMEOUT reaches it
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        for _ in range(4):  # several connections land on both processes
            assert client.completions.create(model=ALIAS, prompt="x", max_tokens=2).choices
        assert len(descendants(router.proc.pid)) >= 2
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            raw = b"".join(iter(lambda: sock.recv(65536), b""))
        assert raw.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in raw, raw
        idle.reuse_after()
    finally:
        router.stop()


def test_idle_connections_outlast_the_clients_keep_alive(stack: Stack) -> None:
    """Each service keeps an idle connection open longer than the official clients do (KEEP_ALIVE_TIMEOUT): closing
    it at uvicorn's default 5 s, the same as their pools' expiry, resets the request a client sends just then."""
    idle = [IdleConnection(s.port) for s in (stack.router, stack.manager, *stack.workers.values())]
    for connection in idle:
        connection.reuse_after()


def test_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        stack.openai().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    resp = stack.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404 and error_of(resp)["code"] == "model_not_found"
    assert stack.get("/v1/models/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400),  # no model
        (b'{"model": 42, "messages": []}', 400),
        (b'\xff\xfe{"model": "tiny"}', 400),  # not UTF-8
    ],
)
def test_malformed_inference_requests(stack: Stack, body: bytes, status: int) -> None:
    resp = stack.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error_of(resp)


@pytest.mark.parametrize(
    "body",
    [
        {"alias": "x", "model_name": "m", "gpu_memory_utilization": 0},
        {"alias": "x", "model_name": "m", "gpu_memory_utilization": 1.5},
        {"alias": "", "model_name": "m"},
        {"alias": "bad/alias", "model_name": "m"},
        {"model_name": "m"},
        {"alias": "x"},
        {"alias": "x", "model_name": "m", "unknown_field": 1},
        {"alias": "x", "model_name": "m", "min_replicas": 3, "max_replicas": 1},
    ],
)
def test_invalid_registrations(stack: Stack, body: dict) -> None:
    resp = stack.post("/v1/models/register", json=body)
    assert resp.status_code == 400, resp.text
    error_of(resp)


def test_duplicate_alias_with_other_settings(stack: Stack, tiny_model: Path) -> None:
    resp = stack.post("/v1/models/register", json={"alias": ALIAS, "model_name": str(tiny_model), "max_model_len": 256})
    assert resp.status_code == 409 and error_of(resp)["code"] == "alias_exists"
    # The same registration again is not an error.
    resp = stack.post("/v1/models/register", json={"alias": ALIAS, "model_name": str(tiny_model), "max_model_len": 512})
    assert resp.status_code == 200


def test_svllm_patch_and_delete(
    stack: Stack, tiny_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's model commands against the real router: a policy changed, a refusal in one sentence, a delete."""
    from serverless_vllm import cli

    monkeypatch.setenv("ROUTER_URL", stack.router.url)
    body = {"alias": "policy", "model_name": str(tiny_model), "preload": False}
    assert stack.post("/v1/models/register", json=body).status_code == 200
    cli.main(["patch", "policy", "--max-replicas", "3", "--idle-timeout", "90", "--routing", "least_loaded"])
    policy = stack.model("policy")["policy"]
    assert (policy["max_replicas"], policy["idle_timeout_s"], policy["routing"]) == (3, 90.0, "least_loaded")
    assert (policy["min_replicas"], policy["preload"]) == (0, False)  # the flags left out: as they were
    assert capsys.readouterr().out.startswith('policy: {"min_replicas": 0, "max_replicas": 3,')
    with pytest.raises(SystemExit) as refused:
        cli.main(["patch", "policy", "--min-replicas", "4"])
    assert refused.value.code == "svllm patch failed (400 invalid_policy): min_replicas must not exceed max_replicas"
    cli.main(["delete", "policy"])
    assert capsys.readouterr().out == "deleted policy\n"
    assert stack.get("/v1/models/policy").status_code == 404


def test_engine_that_fails_to_start(stack: Stack, tmp_path: Path, tiny_model: Path) -> None:
    # A path that is not on the worker: refused by the worker before any engine starts (vLLM would take it for a
    # hub id). Beside it, a start vLLM's argument check refuses (the tiny model has 2048 positions).
    missing = tmp_path / "no-such-model"
    resp = stack.post("/v1/models/register", json={"alias": "broken", "model_name": str(missing)})
    assert resp.status_code == 200
    too_long = {"alias": "too-long", "model_name": str(tiny_model), "max_model_len": 4096}
    assert stack.post("/v1/models/register", json=too_long).status_code == 200
    info = stack.wait_model("broken", "failed", timeout=120)
    assert info["last_error"].startswith(f"model path {missing} does not exist on worker w")
    resp = stack.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    assert resp.status_code == 503 and error_of(resp)["code"] == "model_failed"
    assert error_of(resp)["message"] == f"model 'broken' failed to start: {info['last_error'].partition(chr(10))[0]}"
    assert resp.headers["retry-after"]
    # The engine that failed: the client is told the reason in one line, what is wrong, not only that the argument
    # check failed ("1 validation error for ModelConfig", its first line); the engine log's lines (paths, stack
    # frames) are the operator's.
    refused = stack.wait_model("too-long", "failed", timeout=120)["last_error"]
    reason = refused.partition("\n")[0]
    assert "\n" in refused and "before becoming ready" in reason
    assert "1 validation error for ModelConfig: User-specified max_model_len (4096) is greater than" in reason
    resp = stack.post("/v1/completions", json={"model": "too-long", "prompt": "x"})
    assert resp.status_code == 503 and error_of(resp)["message"] == f"model 'too-long' failed to start: {reason}"
    # The failed engine left no process behind (its process group was swept).
    too_long_arg = b"--max-model-len\x004096\x00"
    wait_until(lambda: not [p for p in engine_pids() if too_long_arg in _cmdline(p)], 30, what="no failed engine")
    assert httpx.delete(f"{stack.router.url}/v1/models/too-long", timeout=10).status_code == 200
    # Nothing else is disturbed.
    assert stack.model(ALIAS)["state"] == "ready"
    assert stack.openai().completions.create(model=ALIAS, prompt="x", max_tokens=2).choices
    assert stack.post("/v1/models/register", json={}).status_code == 400
    assert httpx.delete(f"{stack.router.url}/v1/models/broken", timeout=10).status_code == 200
    assert stack.get("/v1/models/broken").status_code == 404


def test_killed_worker_is_dead_and_leaves_routing(stack: Stack) -> None:
    replica = stack.model(ALIAS)["replicas"][0]
    victim = stack.workers[replica["worker_id"]]
    its_processes = descendants(victim.proc.pid)
    assert its_processes & engine_pids(), "the engine should run under the worker that serves it"
    victim.kill()
    wait_until(lambda: stack.workers_by_id()[victim.name]["state"] == "dead", 30, what="worker declared dead")
    # No orphan: the engine and its engine core died with their worker.
    wait_until(lambda: not any(alive(p) for p in its_processes), 30, what="the killed worker's engine to exit")
    # The model is no longer routed there; it is placed on the surviving worker and serves again.
    info = stack.wait_model(ALIAS, "ready", timeout=240)
    assert all(r["worker_id"] != victim.name for r in info["replicas"])
    assert stack.openai().completions.create(model=ALIAS, prompt="x", max_tokens=2).choices


def test_manager_restart_keeps_registrations(stack: Stack) -> None:
    replicas_before = {r["replica_id"] for r in stack.model(ALIAS)["replicas"]}
    stack.manager.signal(signal.SIGKILL)
    stack.manager.proc.wait(10)
    # While the manager is away, the router keeps serving the ready model from its own table.
    assert stack.openai().completions.create(model=ALIAS, prompt="x", max_tokens=2).choices
    stack.manager.start()
    info = stack.wait_model(ALIAS, "ready", timeout=60)
    assert info["alias"] == ALIAS and info["engine"]["max_model_len"] == 512
    workers = wait_until(
        lambda: (w := stack.workers_by_id()) and any(x["state"] == "healthy" for x in w.values()) and w,
        30,
        what="workers re-registered",
    )
    survivor = [w for w in workers.values() if w["state"] == "healthy"]
    assert survivor and survivor[0]["engines"]
    # The running engine was adopted, not restarted.
    assert {r["replica_id"] for r in stack.model(ALIAS)["replicas"]} == replicas_before
    assert (
        stack.openai()
        .chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        .choices
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
