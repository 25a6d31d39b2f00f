"""The endpoint table, the per-endpoint input checks, multipart reading, the Anthropic error shape and the route
policy for the endpoints beyond chat and completions (end to end: tests/test_endpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from serverless_vllm.config import AuthSettings, RouterSettings
from serverless_vllm.dataplane.body import form_fields
from serverless_vllm.dataplane.endpoints import BY_PATH, ENDPOINTS, LABELS
from serverless_vllm.errors import APIError
from serverless_vllm.manager.http_client import HTTPManagerClient
from serverless_vllm.router.app import create_router_app
from serverless_vllm.schemas import ModelTask
from serverless_vllm.security.auth import CLIENT_OR_ADMIN, OPS_PATHS, WORKER_CALLS, Role, router_policy
from serverless_vllm.security.endpoint_checks import check_endpoint

M = [{"role": "user", "content": "hi"}]


def test_every_endpoint_of_the_issue_is_declared_once() -> None:
    wanted = {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v2/rerank",
        "/v1/score",
        "/score",
        "/classify",
        "/pooling",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/chat/completions/render",
        "/v1/completions/render",
    }
    assert {e.path for e in ENDPOINTS} == wanted and len(ENDPOINTS) == len(wanted)
    assert ENDPOINTS[0].path == "/v1/chat/completions" and ENDPOINTS[1].path == "/v1/completions"  # hot routes first
    assert len(set(LABELS.values())) <= 16  # a bounded label set


def test_tasks_decide_the_endpoints() -> None:
    assert BY_PATH["/v1/embeddings"].serves(ModelTask.EMBED) and not BY_PATH["/v1/embeddings"].serves(
        ModelTask.GENERATE
    )
    assert not BY_PATH["/v1/chat/completions"].serves(ModelTask.EMBED)
    assert BY_PATH["/rerank"].serves(ModelTask.CLASSIFY) and BY_PATH["/rerank"].serves(ModelTask.EMBED)
    assert all(BY_PATH["/tokenize"].serves(t) for t in ModelTask)


GOOD: list[tuple[str, dict[str, Any]]] = [
    ("/v1/embeddings", {"model": "e", "input": ["a", "b"], "encoding_format": "float"}),
    ("/v1/embeddings", {"model": "e", "messages": M}),
    ("/pooling", {"model": "e", "input": "a"}),
    ("/classify", {"model": "c", "input": ["a"]}),
    ("/score", {"model": "e", "text_1": "a", "text_2": ["b", "c"]}),
    ("/v1/score", {"model": "e", "queries": "a", "documents": ["b"]}),
    ("/rerank", {"model": "e", "query": "a", "documents": ["b", "c"], "top_n": 1}),
    ("/v2/rerank", {"model": "e", "query": "a", "documents": ["b"]}),
    ("/v1/responses", {"model": "g", "input": "hi", "max_output_tokens": 8, "stream": True}),
    ("/v1/responses", {"model": "g", "input": [{"role": "user", "content": "hi"}], "previous_response_id": "resp_1"}),
    ("/v1/messages", {"model": "g", "max_tokens": 8, "messages": M, "system": "be brief"}),
    ("/v1/messages/count_tokens", {"model": "g", "messages": M}),
    ("/tokenize", {"model": "g", "prompt": "hi"}),
    ("/tokenize", {"model": "g", "messages": M}),
    ("/detokenize", {"model": "g", "tokens": [1, 2]}),
    ("/v1/chat/completions/render", {"model": "g", "messages": M}),
    ("/v1/completions/render", {"model": "g", "prompt": "x"}),
    ("/v1/audio/transcriptions", {"model": "g", "file": 1234, "language": "en"}),
]


@pytest.mark.parametrize(("path", "body"), GOOD)
def test_valid_bodies_pass(path: str, body: dict[str, Any]) -> None:
    assert check_endpoint(path, BY_PATH[path].family, body) == body["model"]


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/embeddings", {"model": "e"}, "input"),
    ("/v1/embeddings", {"model": "e", "input": []}, "input"),
    ("/v1/embeddings", {"model": "e", "input": ["x"] * 5000}, "input"),
    ("/v1/embeddings", {"model": "e", "input": "x", "request_id": "mine"}, "request_id"),
    ("/v1/embeddings", {"model": "e", "input": "x", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"model": "e", "input": "x", "typo": 1}, "typo"),
    ("/score", {"model": "e", "text_1": "a"}, "text_1"),
    ("/rerank", {"model": "e", "documents": ["a"]}, "query"),
    ("/rerank", {"model": "e", "query": "q", "documents": ["a"] * 2000}, "documents"),
    ("/v1/responses", {"model": "g"}, "input"),
    ("/v1/responses", {"model": "g", "input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ("/v1/responses", {"model": "g", "input": "x", "kv_transfer_params": {}}, "kv_transfer_params"),
    ("/v1/responses", {"model": "g", "input": "x", "previous_response_id": 5}, "previous_response_id"),
    ("/v1/messages", {"model": "g", "messages": M}, "max_tokens"),
    ("/v1/messages", {"model": "g", "max_tokens": 5, "messages": []}, "messages"),
    ("/v1/messages/count_tokens", {"model": "g"}, "messages"),
    ("/tokenize", {"model": "g"}, "prompt"),
    ("/detokenize", {"model": "g", "tokens": ["a"]}, "tokens"),
    ("/v1/chat/completions/render", {"model": "g", "messages": []}, "messages"),
    ("/v1/audio/transcriptions", {"model": "g"}, "file"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_bodies_are_400_naming_the_field(path: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        check_endpoint(path, BY_PATH[path].family, body)
    assert err.value.status == 400 and err.value.details == {"param": param}, err.value.message
    assert err.value.body()["error"]["param"] == param  # OpenAI's place for it


def test_a_bad_model_name_is_404_before_anything() -> None:
    with pytest.raises(APIError) as err:
        check_endpoint("/v1/embeddings", "embeddings", {"model": "not/an alias", "input": "x"})
    assert err.value.status == 404


def _multipart(fields: dict[str, str], file: bytes, boundary: str = "b0und") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    )
    return "".join(parts).encode() + file + f"\r\n--{boundary}--\r\n".encode()


def test_form_fields_decode_text_and_count_files() -> None:
    body = _multipart({"model": "whisper", "language": "en"}, b"RIFF\r\n--not-a-boundary\x00\xff" * 100)
    fields = form_fields(body, "multipart/form-data; boundary=b0und")
    assert fields == {"model": "whisper", "language": "en", "file": 2400}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"no parts at all", "multipart/form-data; boundary=b0und"),
        (b"--b0und\r\nno headers end", "multipart/form-data; boundary=b0und"),
        (_multipart({"model": "x"}, b"a"), "multipart/form-data"),
        (b"--b0und\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b0und--\r\n", "multipart/form-data; boundary=b0und"),
    ],
)
def test_malformed_forms_are_400(body: bytes, content_type: str) -> None:
    with pytest.raises(APIError) as err:
        form_fields(body, content_type)
    assert err.value.status == 400 and err.value.code == "invalid_form"


def test_anthropic_shape_on_messages_only() -> None:
    error = APIError(401, "no key", "missing_api_key")
    anthropic = json.loads(error.response("/v1/messages").body)
    assert anthropic == {"type": "error", "error": {"type": "authentication_error", "message": "no key"}}
    openai = json.loads(error.response("/v1/embeddings").body)
    assert openai["error"]["code"] == "missing_api_key" and openai["error"]["type"] == "authentication_error"


def test_every_router_route_has_a_deliberate_policy(tmp_path: Path) -> None:
    """A valid client key reaches inference and unknown paths (then 404, not 401): so every route that is not
    inference, model reading, ops or a worker call must be an admin route, or a new admin route would be open."""
    settings = RouterSettings(manager_url="http://127.0.0.1:9")
    app = create_router_app(settings, lambda: HTTPManagerClient(settings.manager_url), auth=AuthSettings(mode="off"))
    inference = {e.path for e in ENDPOINTS} | {"/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel"}
    for route in app.routes:
        path = getattr(route, "path", "")
        for method in getattr(route, "methods", None) or {"GET"}:
            roles = router_policy(method, path)
            own_usage = path == "/v1/usage"  # a key made at run time reads its own (router/keys_api.py checks)
            if path in inference or own_usage or (path.startswith("/v1/models") and method in ("GET", "HEAD")):
                assert roles == CLIENT_OR_ADMIN, (method, path)
            elif path in OPS_PATHS:
                assert roles is None, (method, path)
            elif path in WORKER_CALLS:
                assert roles == frozenset({Role.WORKER}), (method, path)
            else:
                assert roles == frozenset({Role.ADMIN}), (method, path)
    assert router_policy("POST", "/no/such/route") == CLIENT_OR_ADMIN  # then the app's 404
