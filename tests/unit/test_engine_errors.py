"""An engine's error answers rewritten in the API's shape (worker/engine_errors.py). The bodies are what vLLM 0.32
wrote here (copied from a CPU engine's answers); tests/test_endpoints.py checks the same with real engines and the
official clients."""

from __future__ import annotations

import json
from typing import Any

from serverless_vllm.worker.engine_errors import reshaped

# vLLM's answer to a Messages request with an unknown role (its request validation: OpenAI's shape on every path).
ROLE = (
    b"{\"error\":{\"message\":\"1 validation error:\\n  {'type': 'literal_error', 'loc': 'body.messages.0.role', "
    b"'msg': \\\"Input should be 'user', 'assistant' or 'system'\\\", 'input': 'bogus', 'ctx': {'expected': "
    b'\\"\'user\', \'assistant\' or \'system\'\\"}}","type":"Bad Request","param":"body.messages.0.role","code":400}}'
)
# Its answer to max_tokens beyond the context, on /v1/messages (Anthropic's envelope, a Python exception's name).
TOO_LONG_MESSAGE = (
    "max_completion_tokens=100000 cannot be greater than max_model_len=2048. Please request fewer output tokens. "
    "(parameter=max_completion_tokens, value=100000)"
)
TOO_LONG = json.dumps({"type": "error", "error": {"type": "BadRequestError", "message": TOO_LONG_MESSAGE}}).encode()


def body(status: int, content: bytes, path: str) -> Any:
    return json.loads(reshaped(status, content, path))


def test_validation_errors_become_one_line_in_anthropics_shape_on_messages() -> None:
    assert body(400, ROLE, "/v1/messages") == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0.role: Input should be 'user', 'assistant' or 'system'",
        },
    }


def test_the_same_in_openais_shape_elsewhere_with_its_param() -> None:
    assert body(400, ROLE, "/v1/chat/completions") == {
        "error": {
            "message": "messages.0.role: Input should be 'user', 'assistant' or 'system'",
            "type": "invalid_request_error",
            "param": "messages.0.role",
            "code": "invalid_request",
        }
    }


def test_an_engines_message_is_kept_and_its_type_made_the_apis() -> None:
    anthropic = body(400, TOO_LONG, "/v1/messages")["error"]
    assert anthropic == {"type": "invalid_request_error", "message": TOO_LONG_MESSAGE}
    openai_shaped = json.dumps(
        {"error": {"message": TOO_LONG_MESSAGE, "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    ).encode()
    assert body(400, openai_shaped, "/v1/completions")["error"] == {
        "message": TOO_LONG_MESSAGE,
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "invalid_request",
    }


def test_five_validation_errors_are_named_then_how_many_more_and_vllms_cut_lines_as_they_are() -> None:
    lines = [
        "12 validation errors:",
        "  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 2 items>'}",
        "  {'type': 'value_error', 'loc': 'body', 'msg': 'Value error, max_tokens must be positive', 'input': 1}",
        "  {'type': 'string_type', 'loc': 'body.model', 'msg': 'Input should be a valid string', 'input': "
        "'x...[truncated]",
        "  {'type': 'int_type', 'loc': 'body.n', 'msg': 'Input should be a valid integer', 'input': 'x'}",
        "  {'type': 'bool_type', 'loc': 'body.echo', 'msg': 'Input should be a valid boolean', 'input': 'x'}",
        "  {'type': 'bool_type', 'loc': 'body.stream', 'msg': 'Input should be a valid boolean', 'input': 'x'}",
        "  ...and 2 more errors",
    ]
    content = json.dumps({"error": {"message": "\n".join(lines), "type": "Bad Request", "code": 400}}).encode()
    assert body(400, content, "/v1/chat/completions")["error"]["message"] == (
        "messages: Field required; max_tokens must be positive; "
        "{'type': 'string_type', 'loc': 'body.model', 'msg': 'Input should be a valid string', 'input': "
        "'x...[truncated]; n: Input should be a valid integer; echo: Input should be a valid boolean; and 7 more"
    )


def test_plain_text_fastapis_detail_and_an_engines_failure() -> None:
    assert body(500, b"Internal Server Error", "/v1/embeddings") == {
        "error": {"message": "Internal Server Error", "type": "server_error", "param": None, "code": "engine_error"}
    }
    assert body(404, b'{"detail":"Not Found"}', "/v1/responses/resp_1")["error"] == {
        "message": "Not Found",
        "type": "not_found_error",
        "param": None,
        "code": "not_found",
    }
    assert body(503, b"", "/v1/messages")["error"] == {"type": "overloaded_error", "message": "the engine answered 503"}
    assert body(400, b"[1, 2]", "/v1/score")["error"]["message"] == "[1, 2]"
    deep = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's depth: its text, cut
    assert body(400, deep, "/v1/score")["error"]["message"] == "[" * 2000


def test_a_union_fields_error_repeated_per_branch_is_said_once() -> None:
    encoding = (
        "  {'type': 'literal_error', 'loc': 'body.encoding_format', 'msg': \"Input should be 'float', 'base64', "
        "'bytes' or 'bytes_only'\", 'input': 'hex', 'ctx': {'expected': \"'float', 'base64', 'bytes' or "
        "'bytes_only'\"}}"
    )
    messages = "  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 3 items>'}"
    lines = ["13 validation errors:", encoding, encoding, messages, encoding, messages] + [encoding] * 5
    content = json.dumps({"error": {"message": "\n".join([*lines, "  ...and 3 more errors"]), "code": 400}}).encode()
    assert body(400, content, "/v1/embeddings")["error"]["message"] == (
        "encoding_format: Input should be 'float', 'base64', 'bytes' or 'bytes_only'; messages: Field required; "
        "and 3 more"
    )
