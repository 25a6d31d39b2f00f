"""Access control and input hardening.

In process (fast): the authenticator, the route policies, the guard middleware (401 shape, 413), the model path
and engine flag policies, the inference checks. End to end (real manager, router and worker processes with a
real CPU vLLM engine, credentials on): every role on every route, the services' own calls to each other,
vLLM's development endpoints out of reach, engines on loopback only, no secret in any log, fail-closed start.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from serverless_vllm.config import AuthSettings
from serverless_vllm.errors import APIError, install_error_handlers
from serverless_vllm.security.auth import (
    AuthConfigError,
    Authenticator,
    GuardMiddleware,
    Role,
    install_guard,
    manager_policy,
    router_policy,
    worker_policy,
)
from serverless_vllm.security.inference import check_inference
from serverless_vllm.security.models import check_engine_args, check_model_name
from starlette.exceptions import HTTPException

from .harness import VENV_BIN, free_port, wait_until
from .secure_harness import (
    ADMIN_KEY,
    API_KEY,
    API_KEY_2,
    SECRETS,
    SHARED_ALIAS,
    SHARED_ENV,
    SHARED_SPEC,
    WORKER_TOKEN,
    Observations,
    SecureStack,
    bearer,
)

ALIAS = SHARED_ALIAS


def settings(**kw: object) -> AuthSettings:
    env = {
        "SVLLM_API_KEYS": f"{API_KEY},{API_KEY_2}",
        "SVLLM_ADMIN_KEY": ADMIN_KEY,
        "SVLLM_WORKER_TOKEN": WORKER_TOKEN,
        "SVLLM_AUTH": "on",
    }
    saved = {k: os.environ.get(k) for k in [*env, "SVLLM_API_KEYS_FILE"]}
    os.environ.update(env)
    os.environ.pop("SVLLM_API_KEYS_FILE", None)
    try:
        return AuthSettings.from_env(**kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# =========================================================================== in process


def test_settings_read_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# client keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("SVLLM_API_KEYS", " env-key , ,env-key-2")
    monkeypatch.setenv("SVLLM_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("SVLLM_AUTH", "on")
    auth = AuthSettings.from_env()
    assert [k.get_secret_value() for k in auth.api_keys] == ["env-key", "env-key-2", "file-key-1", "file-key-2"]
    assert "file-key" not in repr(auth) and "env-key" not in str(auth)  # secrets never in a repr
    monkeypatch.setenv("SVLLM_API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(OSError):
        AuthSettings.from_env()  # a configured but missing key file fails closed
    monkeypatch.setenv("SVLLM_AUTH", "maybe")
    with pytest.raises(ValueError):
        AuthSettings.from_env()


def test_authenticator_roles_and_fail_closed_configuration() -> None:
    auth = Authenticator(settings(), "router")
    client, admin, worker = frozenset({Role.CLIENT, Role.ADMIN}), frozenset({Role.ADMIN}), frozenset({Role.WORKER})
    assert auth.allowed(API_KEY.encode(), client) and auth.allowed(API_KEY_2.encode(), client)
    assert auth.allowed(ADMIN_KEY.encode(), client) and auth.allowed(ADMIN_KEY.encode(), admin)
    assert not auth.allowed(API_KEY.encode(), admin) and not auth.allowed(WORKER_TOKEN.encode(), admin)
    assert auth.allowed(WORKER_TOKEN.encode(), worker) and not auth.allowed(API_KEY.encode(), worker)
    assert not auth.allowed(None, client) and not auth.allowed(b"", client)
    assert not auth.allowed(API_KEY[:-1].encode(), client) and not auth.allowed((API_KEY + "x").encode(), client)
    # On, but a credential the service needs is missing: refuse to start, naming what to set.
    with pytest.raises(AuthConfigError, match="SVLLM_ADMIN_KEY"):
        Authenticator(AuthSettings(api_keys=settings().api_keys, worker_token=settings().worker_token), "router")
    with pytest.raises(AuthConfigError, match="SVLLM_WORKER_TOKEN"):
        Authenticator(AuthSettings(), "worker")
    Authenticator(AuthSettings(worker_token=settings().worker_token), "worker")  # a worker needs the token only
    with pytest.raises(AuthConfigError, match="own secret"):
        Authenticator(
            AuthSettings(
                api_keys=settings().api_keys, admin_key=settings().api_keys[0], worker_token=settings().worker_token
            ),
            "router",
        )
    off = Authenticator(AuthSettings(mode="off"), "router")  # explicitly off: no keys needed
    assert not off.enabled
    assert settings(mode="off").worker_headers() == {} and settings().worker_headers() == bearer(WORKER_TOKEN)


@pytest.mark.parametrize(
    ("policy", "method", "path", "roles"),
    [
        (router_policy, "POST", "/v1/chat/completions", {"client", "admin"}),
        (router_policy, "POST", "/v1/completions", {"client", "admin"}),
        (router_policy, "GET", "/v1/models", {"client", "admin"}),
        (router_policy, "GET", "/v1/models/tiny", {"client", "admin"}),
        (router_policy, "POST", "/v1/models/register", {"admin"}),
        (router_policy, "PATCH", "/v1/models/tiny", {"admin"}),
        (router_policy, "DELETE", "/v1/models/tiny", {"admin"}),
        (router_policy, "GET", "/workers", {"admin"}),
        (router_policy, "GET", "/status", {"admin"}),
        (router_policy, "POST", "/workers/register", {"worker"}),
        (router_policy, "POST", "/workers/heartbeat", {"worker"}),
        (router_policy, "GET", "/openapi.json", {"admin"}),
        (router_policy, "POST", "/v1/embeddings", {"client", "admin"}),
        (router_policy, "POST", "/v1/messages", {"client", "admin"}),
        (router_policy, "POST", "/v1/messages/count_tokens", {"client", "admin"}),
        (router_policy, "GET", "/v1/responses/resp_1", {"client", "admin"}),
        (router_policy, "POST", "/v1/responses/resp_1/cancel", {"client", "admin"}),
        # Anything else: a valid client key reaches the app, whose answer is 404 (or 405); a wrong key is 401.
        (router_policy, "POST", "/sleep", {"client", "admin"}),
        (router_policy, "GET", "/v2/embed", {"client", "admin"}),
        (router_policy, "GET", "/health", None),
        (router_policy, "GET", "/metrics", None),
        (manager_policy, "GET", "/routing", {"admin"}),
        (manager_policy, "POST", "/models", {"admin"}),
        (manager_policy, "POST", "/demand", {"admin"}),
        (manager_policy, "POST", "/workers/heartbeat", {"worker", "admin"}),
        (manager_policy, "GET", "/health", None),
        (worker_policy, "PUT", "/engines", {"worker"}),
        (worker_policy, "GET", "/engines", {"worker"}),
        (worker_policy, "POST", "/v1/completions", {"worker"}),
        (worker_policy, "GET", "/engines/r1/metrics", None),
        (worker_policy, "GET", "/health", None),
    ],
)
def test_route_policies(policy, method: str, path: str, roles: set[str] | None) -> None:
    got = policy(method, path)
    assert (None if got is None else {r.value for r in got}) == roles


@pytest.fixture
def guarded() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def raw(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/v1/models/register")
    async def typed(body: dict) -> dict:
        return {"keys": len(body)}

    @app.post("/v1/messages")
    async def messages(request: Request) -> dict:
        return {"size": len(await request.body())}

    install_guard(app, settings(), "router", router_policy, max_body_bytes=1000)
    return TestClient(app)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


def test_guard_answers_401_in_openai_shape(guarded: TestClient) -> None:
    for headers in (
        {},
        bearer("wrong"),
        {"authorization": f"Basic {API_KEY}"},
        {"authorization": "Bearer"},
        bearer(WORKER_TOKEN),
    ):
        resp = guarded.post("/v1/completions", content=b"{}", headers=headers)
        assert resp.status_code == 401, headers
        err = _error(resp)
        assert err["type"] == "authentication_error" and err["code"] in ("missing_api_key", "invalid_api_key")
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert API_KEY not in resp.text and WORKER_TOKEN not in resp.text
    assert guarded.post("/v1/completions", content=b"{}", headers=bearer(API_KEY)).status_code == 200
    assert (
        guarded.post("/v1/completions", content=b"{}", headers={"Authorization": f"bearer {API_KEY}"}).status_code
        == 200
    )
    # A client key is not an admin key.
    assert guarded.post("/v1/models/register", json={}, headers=bearer(API_KEY)).status_code == 401
    assert guarded.post("/v1/models/register", json={}, headers=bearer(ADMIN_KEY)).status_code == 200


def _anthropic_error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert {"type", "message"} <= set(body["error"]), body
    return body["error"]


def test_guard_x_api_key_anthropic_shape_and_unknown_routes(guarded: TestClient) -> None:
    # Anthropic's clients send the key as x-api-key; on /v1/messages a refusal comes in Anthropic's shape.
    assert guarded.post("/v1/messages", content=b"{}", headers={"x-api-key": API_KEY}).status_code == 200
    assert guarded.post("/v1/completions", content=b"{}", headers={"x-api-key": API_KEY}).status_code == 200
    # Both: the Authorization header is the credential.
    both = {"authorization": f"Bearer {API_KEY}", "x-api-key": "wrong"}
    assert guarded.post("/v1/completions", content=b"{}", headers=both).status_code == 200
    both = {"authorization": "Bearer wrong", "x-api-key": API_KEY}
    assert guarded.post("/v1/completions", content=b"{}", headers=both).status_code == 401
    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": ""}, bearer("wrong"), {"x-api-key": WORKER_TOKEN}):
        resp = guarded.post("/v1/messages", content=b"{}", headers=headers)
        assert resp.status_code == 401, headers
        assert _anthropic_error(resp)["type"] == "authentication_error"
        assert API_KEY not in resp.text and WORKER_TOKEN not in resp.text
    # A valid key on a route the app does not serve: the app's 404 (OpenAI shape), not a 401; a wrong key: 401.
    for method, path in (("POST", "/v1/nope"), ("GET", "/v2/embed"), ("POST", "/sleep")):
        for key in (API_KEY, ADMIN_KEY):
            resp = guarded.request(method, path, json={}, headers=bearer(key))
            assert resp.status_code == 404 and _error(resp)["code"] == "not_found", (method, path, resp.text)
        for headers in ({}, bearer("wrong"), bearer(WORKER_TOKEN)):
            resp = guarded.request(method, path, json={}, headers=headers)
            assert resp.status_code == 401 and _error(resp)["type"] == "authentication_error", (path, headers)


def test_guard_limits_body_size(guarded: TestClient) -> None:
    headers = bearer(ADMIN_KEY)
    assert guarded.post("/v1/completions", content=b"x" * 1000, headers=headers).status_code == 200
    big = guarded.post("/v1/completions", content=b"x" * 1001, headers=headers)
    assert big.status_code == 413 and _error(big)["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(11):
            yield b"x" * 100

    assert guarded.post("/v1/completions", content=chunks(), headers=headers).status_code == 413
    assert guarded.post("/v1/models/register", content=chunks(), headers=headers).status_code == 413
    # Unauthenticated: refused before a byte of the body is read.
    assert guarded.post("/v1/completions", content=b"x" * 5000).status_code == 401


def test_only_a_body_not_framed_by_its_length_is_counted_as_it_arrives() -> None:
    """A body with a Content-Length within the limit cannot grow past it (the server reads no more), so the app gets
    the server's own `receive`; a chunked one, or one that says both (a server may read it as chunked), is counted
    as it arrives and refused past the limit."""
    seen: list[object] = []

    async def app(scope: object, receive: object, send: object) -> None:
        seen.append(receive)
        while (await receive())["more_body"]:  # type: ignore[operator]
            pass

    guard = GuardMiddleware(app, Authenticator(AuthSettings(mode="off"), "router"), router_policy, 1000)

    def body(headers: list[tuple[bytes, bytes]]) -> object:
        parts = [{"type": "http.request", "body": b"x" * 100, "more_body": True} for _ in range(11)]
        parts.append({"type": "http.request", "body": b"", "more_body": False})

        async def receive() -> object:
            return parts.pop(0)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
        asyncio.run(guard(scope, receive, None))  # type: ignore[arg-type]
        return receive

    own = body([(b"content-length", b"900")])
    assert seen[-1] is own  # framed: nothing in between
    for headers in (
        [(b"transfer-encoding", b"chunked")],
        [(b"content-length", b"900"), (b"transfer-encoding", b"chunked")],
    ):
        with pytest.raises(HTTPException) as too_large:
            body(headers)
        assert too_large.value.status_code == 413


def test_the_guard_remembers_each_routes_roles_by_method_and_path() -> None:
    """The policy is asked once per method and path (the roles are remembered: a lookup per request), GET and
    POST of one path keep their own roles, and a client's random paths, once the memory is full, are still asked
    and answered right, not remembered."""
    asked: list[tuple[str, str]] = []

    def policy(method: str, path: str) -> frozenset[Role] | None:
        asked.append((method, path))
        return router_policy(method, path)

    statuses: list[int] = []

    async def app(scope: object, receive: object, send: object) -> None:
        statuses.append(200)

    auth = Authenticator(settings(), "router")
    guard = GuardMiddleware(app, auth, policy, 1000)

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    def call(method: str, path: str, key: str) -> int:
        headers = [(b"host", b"x"), (b"authorization", f"Bearer {key}".encode())]
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}
        asyncio.run(guard(scope, None, send))  # type: ignore[arg-type]
        return statuses[-1]

    for _ in range(3):
        assert call("GET", "/v1/models", API_KEY) == 200
        assert call("POST", "/v1/models", API_KEY) == 401  # registering is the admin's
        assert call("POST", "/v1/models", ADMIN_KEY) == 200
        assert call("GET", "/metrics", "wrong") == 200  # public
    assert asked == [("GET", "/v1/models"), ("POST", "/v1/models"), ("GET", "/metrics")]
    for i in range(300):  # more routes than it remembers
        assert call("POST", f"/v1/random-{i}", "wrong") == 401
    asked.clear()
    assert call("POST", "/v1/random-299", "wrong") == 401 and asked == [("POST", "/v1/random-299")]
    assert call("POST", "/v1/models", API_KEY) == 401 and asked == [("POST", "/v1/random-299")]


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "org/model.v1_2-x", "/models/tiny", "/models/org/tiny/", "/models"]
)
def test_allowed_model_names(name: str) -> None:
    check_model_name(name, ["/models"])


@pytest.mark.parametrize(
    "name",
    [
        "/etc",
        "/models/../etc/passwd",
        "/models/x/../../etc",
        "../models/tiny",
        "models/../../etc",
        "./tiny",
        "~/models",
        "org/../x",
        "a/b/c",
        "org/x--y",
        "file:///models/tiny",
        "s3://bucket/model",
        "/models\x00/x",
        "-org/x",
        "org/x.",
        "/modelsX/tiny",
        "org/" + "x" * 200,
    ],
)
def test_refused_model_names(name: str) -> None:
    with pytest.raises(APIError) as err:
        check_model_name(name, ["/models"])
    assert err.value.status == 400 and err.value.code == "model_not_allowed"


def test_local_paths_need_configured_dirs_and_symlinks_cannot_escape(tmp_path: Path) -> None:
    with pytest.raises(APIError, match="SVLLM_MODEL_DIRS"):
        check_model_name("/models/tiny", [])
    check_model_name("Qwen/Qwen2.5-0.5B-Instruct", [])  # hub ids need no directory
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")
    with pytest.raises(APIError):
        check_model_name(str(allowed / "escape"), [str(allowed)])
    check_model_name("/anything/at/all", ["/"])  # `svllm up` local mode


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0"],
        ["--host=0.0.0.0"],
        ["--port", "1"],
        ["--ho", "x"],
        ["--served_model_name", "x"],
        ["--model", "/etc"],
        ["--trust-remote-code"],
        ["--middleware", "os.system"],
        ["--worker-cls", "x.Y"],
        ["--api-key", "k"],
        ["--kv-transfer-config", "{}"],
        ["--kv-transfer-config.kv_connector", "x"],
        ["--tokenizer", "/etc"],
        ["--config", "/tmp/x.yaml"],
        ["--uds", "/tmp/s"],
    ],
)
def test_refused_engine_args(args: list[str]) -> None:
    with pytest.raises(APIError) as err:
        check_engine_args(args)
    assert err.value.code == "engine_arg_not_allowed"


def test_allowed_engine_args() -> None:
    check_engine_args(
        [
            "--enforce-eager",
            "--max-num-seqs",
            "8",
            "--enable-prefix-caching",
            "--seed=1",
            "--tokenizer-mode",
            "auto",
            "-tp",
            "1",
            "--kv-cache-dtype",
            "auto",
        ]
    )


M = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": "tiny", "messages": M}, None),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5, "stream": True}, None),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 2], "n": 2, "temperature": 0.5, "seed": 3}, None),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "no role"}]}, 400),
        ("/v1/chat/completions", {"model": "tiny", "messages": [5]}, 400),
        ("/v1/completions", {"model": "tiny"}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**30}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": True}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 1000}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "bogus_field": 1}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "request_id": "mine"}, 400),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "kv_transfer_params": {}}, 400),
        ("/v1/chat/completions", {"model": "tiny", "messages": M, "chat_template": "{{ 7*7 }}"}, 400),
        ("/v1/completions", {"model": 5, "prompt": "x"}, 400),
        ("/v1/completions", {"model": "../routing", "prompt": "x"}, 404),
        ("/v1/completions", {"model": "a?b=c", "prompt": "x"}, 404),
    ],
)
def test_inference_checks(path: str, body: dict, status: int | None) -> None:
    if status is None:
        assert check_inference(path, body) == "tiny"
    else:
        with pytest.raises(APIError) as err:
            check_inference(path, body)
        assert err.value.status == status


# =========================================================================== end to end


@pytest.fixture(scope="module")
def obs() -> Iterator[Observations]:
    o = Observations("security")
    yield o
    o.write()


@pytest.fixture(scope="module")
def stack(secure_stack: SecureStack) -> SecureStack:
    return secure_stack


@dataclass(frozen=True)
class XApiKey:
    """A key sent as `x-api-key: <key>` (as Anthropic's clients send it) instead of `Authorization: Bearer`."""

    key: str


Credential = str | XApiKey | None


def call(method: str, url: str, key: Credential, **kw: object) -> httpx.Response:
    headers = {"x-api-key": key.key} if isinstance(key, XApiKey) else bearer(key) if key else {}
    return httpx.request(method, url, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]


def _who(key: Credential) -> str:
    """The credential's role, for messages and observations (never the secret)."""
    if key is None:
        return "none"
    name = next(
        (
            n
            for n, k in [("client", API_KEY), ("client", API_KEY_2), ("admin", ADMIN_KEY), ("worker", WORKER_TOKEN)]
            if k == (key.key if isinstance(key, XApiKey) else key)
        ),
        "wrong",
    )
    return f"{name} (x-api-key)" if isinstance(key, XApiKey) else name


CHAT = {"model": ALIAS, "messages": M, "max_tokens": 2}


def test_router_roles(stack: SecureStack, obs: Observations) -> None:
    r = stack.router.url
    matrix: dict[tuple[str, str, str | None], dict[Credential, int]] = {  # (method, path, body) -> {key: status}
        ("POST", "/v1/chat/completions", "chat"): {
            None: 401,
            "wrong": 401,
            WORKER_TOKEN: 401,
            API_KEY: 200,
            API_KEY_2: 200,
            ADMIN_KEY: 200,
        },
        ("GET", "/v1/models", None): {None: 401, "wrong": 401, WORKER_TOKEN: 401, API_KEY: 200, ADMIN_KEY: 200},
        ("GET", f"/v1/models/{ALIAS}", None): {None: 401, API_KEY: 200, ADMIN_KEY: 200},
        ("POST", "/v1/models/register", "spec"): {None: 401, API_KEY: 401, WORKER_TOKEN: 401, ADMIN_KEY: 200},
        ("PATCH", f"/v1/models/{ALIAS}", "patch"): {None: 401, API_KEY: 401, WORKER_TOKEN: 401, ADMIN_KEY: 200},
        ("DELETE", "/v1/models/never-there", None): {None: 401, API_KEY: 401, WORKER_TOKEN: 401, ADMIN_KEY: 404},
        ("GET", "/workers", None): {None: 401, API_KEY: 401, WORKER_TOKEN: 401, ADMIN_KEY: 200},
        ("POST", "/workers/heartbeat", "beat"): {None: 401, API_KEY: 401, ADMIN_KEY: 401, WORKER_TOKEN: 200},
        ("GET", "/openapi.json", None): {None: 401, API_KEY: 401, ADMIN_KEY: 200},
        ("GET", "/health", None): {None: 200},
        ("GET", "/metrics", None): {None: 200},
        # The other model-addressed endpoints need a client key too; `tiny` generates, so embeddings is a 400.
        ("POST", "/v1/embeddings", "embed"): {None: 401, "wrong": 401, WORKER_TOKEN: 401, API_KEY: 400},
        # Messages (Anthropic): refusals in Anthropic's shape; its clients send the key as x-api-key.
        ("POST", "/v1/messages", "messages"): {
            None: 401,
            "wrong": 401,
            XApiKey("wrong"): 401,
            WORKER_TOKEN: 401,
            API_KEY: 200,
            XApiKey(API_KEY): 200,
        },
        ("POST", "/v1/messages/count_tokens", "count"): {None: 401, XApiKey("wrong"): 401, XApiKey(API_KEY): 200},
        # A valid key on a route the router does not serve: the app's 404, not a 401; a wrong key is still 401.
        ("POST", "/v1/nope", "chat"): {None: 401, "wrong": 401, WORKER_TOKEN: 401, API_KEY: 404, ADMIN_KEY: 404},
        ("GET", "/v2/embed", None): {None: 401, "wrong": 401, XApiKey("wrong"): 401, API_KEY: 404, ADMIN_KEY: 404},
    }
    bodies = {
        "chat": CHAT,
        "embed": {"model": ALIAS, "input": "hi"},
        "messages": {"model": ALIAS, "messages": M, "max_tokens": 2},
        "count": {"model": ALIAS, "messages": M},
        "spec": {"alias": ALIAS, "model_name": stack.model(ALIAS)["model_name"], **SHARED_SPEC},  # idempotent
        "patch": {"idle_timeout_s": 600},
        "beat": {"worker_id": "nobody"},
        None: None,
    }
    unknown = {"/v1/nope", "/v2/embed"}
    seen = []
    for (method, path, body), expected in matrix.items():
        for key, status in expected.items():
            resp = call(method, r + path, key, json=bodies[body])
            assert resp.status_code == status, (method, path, _who(key), resp.text[:300])
            if status == 401:
                shaped = _anthropic_error if path.startswith("/v1/messages") else _error
                assert shaped(resp)["type"] == "authentication_error", (path, resp.text[:300])
            if status == 404 and path in unknown:  # the app's own 404, in the OpenAI shape
                assert _error(resp)["code"] == "not_found", (method, path, resp.text[:300])
            seen.append((method, path, _who(key), resp.status_code))
    obs.record("router_role_matrix", seen)
    # The official client with a key works, without one it is an AuthenticationError.
    assert stack.openai().chat.completions.create(model=ALIAS, messages=M, max_tokens=2).choices
    import openai

    with pytest.raises(openai.AuthenticationError):
        stack.openai(api_key="not-a-key").models.list()


def test_worker_and_manager_need_their_credentials(stack: SecureStack, obs: Observations) -> None:
    w, m = stack.workers["w1"].url, stack.manager.url
    replica = stack.model(ALIAS)["replicas"][0]["replica_id"]
    checks = [
        # worker: the manager's /engines and the router's inference need the worker token
        ("PUT", f"{w}/engines", {None: 401, API_KEY: 401, ADMIN_KEY: 401}, []),
        ("GET", f"{w}/engines", {None: 401, API_KEY: 401, WORKER_TOKEN: 200}, None),
        ("POST", f"{w}/v1/chat/completions", {None: 401, API_KEY: 401, ADMIN_KEY: 401, WORKER_TOKEN: 200}, CHAT),
        ("GET", f"{w}/health", {None: 200}, None),
        ("GET", f"{w}/engines/{replica}/metrics", {None: 200}, None),
        # manager: the registry and routing need the admin key (the routers' credential), workers the token
        ("GET", f"{m}/models", {None: 401, API_KEY: 401, WORKER_TOKEN: 401, ADMIN_KEY: 200}, None),
        ("GET", f"{m}/routing", {None: 401, API_KEY: 401, WORKER_TOKEN: 401, ADMIN_KEY: 200}, None),
        ("POST", f"{m}/models", {None: 401, API_KEY: 401, WORKER_TOKEN: 401}, {"alias": "x", "model_name": "o/x"}),
        ("POST", f"{m}/demand", {None: 401, WORKER_TOKEN: 401}, {"router_id": "r"}),
        ("POST", f"{m}/workers/heartbeat", {None: 401, API_KEY: 401, WORKER_TOKEN: 200}, {"worker_id": "nobody"}),
        ("GET", f"{m}/health", {None: 200}, None),
    ]
    seen = []
    for method, url, expected, body in checks:
        for key, status in expected.items():
            resp = call(method, url, key, json=body)
            assert resp.status_code == status, (method, url, key and key[:12], resp.text[:300])
            seen.append((method, url.split(":", 2)[-1].split("/", 1)[-1], key is not None, resp.status_code))
    obs.record("worker_manager_checks", len(seen))
    # The services' own calls carry their credentials: the worker is registered and heartbeats, the manager
    # pushed the engine to it, the router reaches it (the chat above went router -> worker -> engine).
    worker = stack.workers_by_id()["w1"]
    assert worker["state"] == "healthy" and worker["heartbeat_age_s"] < 3
    assert [e["state"] for e in stack.engines("w1")] == ["ready"]


DEV_ENDPOINTS = [
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_mm_cache"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("GET", "/server_info"),
    ("POST", "/scale_elastic_ep"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/invocations"),
    ("GET", "/version"),
    ("GET", "/ping"),
    # vLLM routes beside the model-addressed endpoints (dataplane/endpoints.py) that are served: raw generation
    # from token ids, (de)rendering, batch and scoring variants, other vendors' shapes, operator controls.
    ("POST", "/inference/v1/generate"),
    ("POST", "/v1/chat/completions/derender"),
    ("POST", "/v1/completions/derender"),
    ("POST", "/v1/messages/render"),
    ("POST", "/v1/responses/render"),
    ("POST", "/generative_scoring"),
    ("POST", "/v2/embed"),
    ("POST", "/cohere/v2/chat"),
    ("GET", "/tokenizer_info"),
    ("POST", "/fault_tolerance/apply"),
    ("POST", "/v1/chat/completions/batch"),
    ("POST", "/abort_requests"),
]


def test_vllm_admin_and_dev_endpoints_are_out_of_reach(stack: SecureStack, obs: Observations) -> None:
    router, worker = stack.router.url, stack.workers["w1"].url
    results = {}
    for method, path in DEV_ENDPOINTS:
        # Even with the strongest credential of each hop, nothing but inference is forwarded.
        via_router = call(method, router + path, ADMIN_KEY, json={})
        via_worker = call(method, worker + path, WORKER_TOKEN, json={})
        assert via_router.status_code in (404, 405), (path, via_router.status_code)
        assert via_worker.status_code in (404, 405), (path, via_worker.status_code)
        results[path] = (via_router.status_code, via_worker.status_code)
    obs.record("dev_endpoints_router_worker_status", results)
    # The engine itself listens on loopback only.
    port = stack.engines("w1")[0]["port"]
    listeners = [
        line.split()[1]
        for f in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(f).read_text().splitlines()[1:]
        if line.split()[3] == "0A"
    ]  # LISTEN
    mine = [addr for addr in listeners if int(addr.rsplit(":", 1)[1], 16) == port]
    assert mine and all(addr.split(":")[0] in ("0100007F", "00000000000000000000000001000000") for addr in mine)
    obs.record("engine_listens_on", mine)


def test_model_source_policy_end_to_end(stack: SecureStack, tiny_model: Path, obs: Observations) -> None:
    refused = {}
    for name, extra in [
        ("/etc", []),
        (f"{tiny_model}/../../../etc", []),
        ("../../etc/passwd", []),
        ("org/x", ["--host", "0.0.0.0"]),
        ("org/x", ["--trust-remote-code"]),
        ("org/x", ["--middleware", "os.system"]),
    ]:
        resp = stack.post("/v1/models/register", json={"alias": "evil", "model_name": name, "extra_args": extra})
        assert resp.status_code == 400, (name, extra, resp.text)
        refused[f"{name} {' '.join(extra)}".strip()] = _error(resp)["code"]
    assert stack.get("/v1/models/evil").status_code == 404
    for alias in ["bad/alias", "a" * 200, "-x", "x y"]:
        resp = stack.post("/v1/models/register", json={"alias": alias, "model_name": "org/x"})
        assert resp.status_code == 400
    obs.record("refused_registrations", refused)


def test_no_secret_in_any_log(stack: SecureStack) -> None:
    logs = stack.all_logs()
    assert "registered" in logs  # the logs are there and were written
    for secret in SECRETS:
        assert secret not in logs


def test_services_refuse_to_start_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVLLM_")}
    for command in (
        ["manager", "--port", str(free_port())],
        ["router", "--port", str(free_port())],
        ["worker", "--port", str(free_port())],
    ):
        out = subprocess.run(
            [str(VENV_BIN / "svllm"), *command],
            env={**env, "MANAGER_DB": str(tmp_path / "m.db")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0 and "SVLLM_AUTH=off" in out.stderr, (command, out.stderr[-500:])


def test_worker_with_wrong_token_is_refused_by_the_manager(stack: SecureStack) -> None:
    intruder = stack.add_worker("intruder", env={"SVLLM_WORKER_TOKEN": "not-the-token"})
    try:
        wait_until(lambda: "invalid credentials" in intruder.log(), 20, what="the intruder's refusal in its log")
        assert httpx.get(f"{intruder.url}/health", timeout=5).json()["registered"] is False
        assert "intruder" not in stack.workers_by_id()
    finally:
        intruder.stop()
        del stack.workers["intruder"]


def test_clients_that_stall_are_answered_408_and_the_router_serves_on(stack: SecureStack) -> None:
    """The shared stack's router runs with CLIENT_TIMEOUT=3 (tests/secure_harness.py; dataplane/server_protocol.py):
    a request whose body pauses and one whose head comes a line at a time (slowloris) are each answered 408 in the
    OpenAI shape and their connections closed, while a client of the official SDK is served beside them; the paused
    request counts as a 499 (its client left) and nothing is logged as an error."""
    timeout = float(SHARED_ENV["CLIENT_TIMEOUT"])
    router, log_path = stack.router, stack.router.log_path
    logged_before = log_path.stat().st_size
    gone = 'svllm_requests_total{endpoint="chat_completions",model="_unknown",status="499"}'
    failed = 'svllm_requests_total{endpoint="chat_completions",model="_unknown",status="500"}'

    def counted(series: str) -> float:
        text = httpx.get(f"{router.url}/metrics", timeout=10).text
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)

    gone_before, failed_before = counted(gone), counted(failed)
    body = json.dumps(CHAT).encode()
    paused = socket.create_connection(("127.0.0.1", router.port))
    paused.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body[:10])
    )
    trickled = socket.create_connection(("127.0.0.1", router.port))
    trickled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    for i in range(6):  # until 0.9 timeouts: its head is cut off at 1 to 1.25 however it trickles
        time.sleep(timeout * 0.15)
        trickled.sendall(b"x-slow-%d: y\r\n" % i)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model=ALIAS, messages=M, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"
    for sock in (paused, trickled):
        sock.settimeout(timeout * 3)
        raw = b"".join(iter(lambda s=sock: s.recv(65536), b""))  # until the router closes it
        sock.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), raw
        assert json.loads(rest)["error"]["code"] == "request_timeout", raw
    # The paused request's handler, waiting for its body, learns that its client left (the trickled head never
    # reached the app).
    wait_until(lambda: counted(gone) == gone_before + 1, 10, what="the paused request counted as a 499")
    assert counted(failed) == failed_before
    with log_path.open(errors="replace") as log:
        log.seek(logged_before)
        written = log.read()
    assert "Traceback" not in written and " ERROR " not in written, written[-3000:]
