"""Bad input against real processes (credentials on, a real CPU vLLM engine): a catalogue of malformed requests,
streams the client drops early, and schemathesis fuzzing of the router's, the worker's and the manager's APIs
from their own OpenAPI schemas. Zero server errors; the only 5xx allowed are documented 503s (cold-start
timeout, failed model, replica not on this worker), and the engine is never left stuck.

Operations whose valid input legitimately starts engines or points the manager at arbitrary URLs (a worker's
PUT /engines, worker registration) are fuzzed with invalid input only; the real model is never deleted.
"""

from __future__ import annotations

import importlib
import json
import socket
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serverless_vllm.security.endpoint_checks import (
    AUDIO_FIELDS,
    CHECKS,
    CLASSIFY_FIELDS,
    COUNT_TOKENS_FIELDS,
    DETOKENIZE_FIELDS,
    EMBEDDING_FIELDS,
    MESSAGES_FIELDS,
    POOLING_FIELDS,
    RERANK_FIELDS,
    RESPONSES_FIELDS,
    SCORE_FIELDS,
    TOKENIZE_FIELDS,
)
from serverless_vllm.security.inference import CHAT_FIELDS, COMPLETION_FIELDS, OPERATOR_FIELDS

from .harness import engine_metric
from .secure_harness import (
    ADMIN_KEY,
    API_KEY,
    SHARED_ALIAS,
    SHARED_MAX_MODEL_LEN,
    WORKER_TOKEN,
    Observations,
    SecureStack,
    bearer,
)

ALIAS = SHARED_ALIAS
MAX_MODEL_LEN = SHARED_MAX_MODEL_LEN
M = [{"role": "user", "content": "hi"}]
# 503s the API documents (with Retry-After): they are answers, not server errors.
DOCUMENTED_503 = {
    "cold_start_timeout",
    "model_failed",
    "queue_full",
    "overloaded",
    "replica_unavailable",
    "manager_unavailable",
}


@pytest.fixture(scope="module")
def obs() -> Iterator[Observations]:
    o = Observations("fuzz")
    yield o
    o.write()


@pytest.fixture(scope="module")
def stack(secure_stack: SecureStack) -> SecureStack:
    return secure_stack


# endpoint family -> (vLLM 0.32 module, its request models, our allow-list): every family the router serves.
VLLM_REQUEST_MODELS: dict[str, tuple[str, tuple[str, ...], frozenset[str]]] = {
    "chat": ("vllm.entrypoints.openai.chat_completion.protocol", ("ChatCompletionRequest",), CHAT_FIELDS),
    "completion": ("vllm.entrypoints.openai.completion.protocol", ("CompletionRequest",), COMPLETION_FIELDS),
    "embeddings": (
        "vllm.entrypoints.pooling.embed.protocol",
        ("EmbeddingCompletionRequest", "EmbeddingChatRequest"),
        EMBEDDING_FIELDS,
    ),
    "pooling": (
        "vllm.entrypoints.pooling.pooling.protocol",
        ("PoolingCompletionRequest", "PoolingChatRequest"),
        POOLING_FIELDS,
    ),
    "classify": (
        "vllm.entrypoints.pooling.classify.protocol",
        ("ClassificationCompletionRequest", "ClassificationChatRequest"),
        CLASSIFY_FIELDS,
    ),
    "score": (
        "vllm.entrypoints.pooling.scoring.protocol",
        ("ScoreDataRequest", "ScoreQueriesDocumentsRequest", "ScoreQueriesItemsRequest", "ScoreTextRequest"),
        SCORE_FIELDS,
    ),
    "rerank": ("vllm.entrypoints.pooling.scoring.protocol", ("RerankRequest",), RERANK_FIELDS),
    "responses": ("vllm.entrypoints.openai.responses.protocol", ("ResponsesRequest",), RESPONSES_FIELDS),
    "messages": ("vllm.entrypoints.anthropic.protocol", ("AnthropicMessagesRequest",), MESSAGES_FIELDS),
    "count_tokens": ("vllm.entrypoints.anthropic.protocol", ("AnthropicCountTokensRequest",), COUNT_TOKENS_FIELDS),
    "tokenize": (
        "vllm.entrypoints.serve.tokenize.protocol",
        ("TokenizeCompletionRequest", "TokenizeChatRequest"),
        TOKENIZE_FIELDS,
    ),
    "detokenize": ("vllm.entrypoints.serve.tokenize.protocol", ("DetokenizeRequest",), DETOKENIZE_FIELDS),
    "transcription": (
        "vllm.entrypoints.speech_to_text.transcription.protocol",
        ("TranscriptionRequest",),
        AUDIO_FIELDS,
    ),
    "translation": ("vllm.entrypoints.speech_to_text.translation.protocol", ("TranslationRequest",), AUDIO_FIELDS),
}


def test_router_field_lists_cover_installed_vllm() -> None:
    """The router's allow-lists are vLLM's request fields (minus operator-only ones): a new vLLM field shows here.
    Every family with an input check is covered (render reuses chat's and completions' lists)."""
    pytest.importorskip("vllm")
    assert set(VLLM_REQUEST_MODELS) == set(CHECKS) | {"chat", "completion"}
    missing = {}
    for family, (module_name, model_names, ours) in VLLM_REQUEST_MODELS.items():
        module = importlib.import_module(module_name)  # a moved module fails here: vLLM changed, look again
        for name in model_names:
            fields = set(getattr(module, name).model_fields)
            assert "model" in fields, (family, name)  # a request model, not a response or a part of one
            if fields - OPERATOR_FIELDS - ours:
                missing[f"{family}: {name}"] = sorted(fields - OPERATOR_FIELDS - ours)
    assert not missing, f"vLLM request fields missing from our allow-lists (or from OPERATOR_FIELDS): {missing}"


def running_requests(stack: SecureStack) -> float:
    return _engine(stack, "vllm:num_requests_running")


def _engine(stack: SecureStack, metric: str) -> float:
    replica = stack.model(ALIAS)["replicas"][0]["replica_id"]
    return engine_metric(stack.workers["w1"].url, replica, metric)


def _send(stack: SecureStack, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        stack.router.url + path,
        content=content,
        timeout=60,
        headers={"content-type": "application/json", **bearer(API_KEY), **(headers or {})},
    )


def _j(body: Any) -> bytes:
    return json.dumps(body).encode()


BAD_INPUTS: list[tuple[str, str, bytes, dict[str, str] | None]] = [
    ("invalid JSON", "/v1/chat/completions", b"{not json", None),
    ("invalid UTF-8", "/v1/chat/completions", b'{"model": "tiny", "messages": "\xff\xfe"}', None),
    ("JSON array body", "/v1/completions", b"[1, 2]", None),
    ("empty body", "/v1/completions", b"", None),
    ("10^5 nested arrays", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, None),
    ("NaN temperature", "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', None),
    (
        "5000-digit integer",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        None,
    ),
    ("missing model", "/v1/chat/completions", _j({"messages": M}), None),
    ("model of wrong type", "/v1/chat/completions", _j({"model": ["tiny"], "messages": M}), None),
    ("model with path characters", "/v1/completions", _j({"model": "../workers", "prompt": "x"}), None),
    ("unknown model", "/v1/completions", _j({"model": "nope", "prompt": "x"}), None),
    ("empty messages", "/v1/chat/completions", _j({"model": ALIAS, "messages": []}), None),
    ("message without role", "/v1/chat/completions", _j({"model": ALIAS, "messages": [{"content": "x"}]}), None),
    (
        "message content of wrong type",
        "/v1/chat/completions",
        _j({"model": ALIAS, "messages": [{"role": "user", "content": 5}]}),
        None,
    ),
    ("empty prompt", "/v1/completions", _j({"model": ALIAS, "prompt": ""}), None),
    (
        "prompt longer than the context",
        "/v1/completions",
        _j({"model": ALIAS, "prompt": "hello " * (2 * MAX_MODEL_LEN)}),  # one token or more per word
        None,
    ),
    ("out-of-vocabulary token ids", "/v1/completions", _j({"model": ALIAS, "prompt": [10**12]}), None),
    ("max_tokens 10^30", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "max_tokens": 10**30}), None),
    (
        "max_tokens above the context",
        "/v1/completions",
        _j({"model": ALIAS, "prompt": "x", "max_tokens": 100_000}),
        None,
    ),
    ("max_tokens as string", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "max_tokens": "8"}), None),
    ("negative max_tokens", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "max_tokens": -1}), None),
    ("n = 1000", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "n": 1000}), None),
    ("temperature -1", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "temperature": -1}), None),
    ("logprobs 10^5", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "logprobs": 100_000}), None),
    ("stop of wrong type", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "stop": [1, 2]}), None),
    (
        "invalid regex for structured output",
        "/v1/completions",
        _j({"model": ALIAS, "prompt": "x", "structured_outputs": {"regex": "("}}),
        None,
    ),
    ("unknown field", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "tempreature": 0.5}), None),
    ("client-set request_id", "/v1/completions", _j({"model": ALIAS, "prompt": "x", "request_id": "r1"}), None),
    (
        "client chat template",
        "/v1/chat/completions",
        _j({"model": ALIAS, "messages": M, "chat_template": "{{x}}"}),
        None,
    ),
    (
        "stream_options without stream",
        "/v1/completions",
        _j({"model": ALIAS, "prompt": "x", "stream_options": {"include_usage": True}}),
        None,
    ),
    (
        "tool_choice without tools",
        "/v1/chat/completions",
        _j({"model": ALIAS, "messages": M, "tool_choice": "required"}),
        None,
    ),
    ("9 MiB body", "/v1/completions", _j({"model": ALIAS, "prompt": "x" * (9 * 1024 * 1024)}), None),
    (
        "text/plain content type",
        "/v1/completions",
        _j({"model": ALIAS, "prompt": "x", "max_tokens": 1}),
        {"content-type": "text/plain"},
    ),
]


AUTH = f"Authorization: Bearer {API_KEY}\r\n"
RAW_REQUESTS = [  # malformed HTTP that no client library sends
    (
        "Content-Length not a number",
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: abc\r\n\r\n{{}}",
    ),
    (
        "two different Content-Lengths",
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}",
    ),
    ("64 KiB header", f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{AUTH}X-Big: {'a' * 65536}\r\n\r\n"),
    (
        "invalid chunked encoding",
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
    ),
]


def raw_answer(port: int, request: str) -> tuple[int, bytes]:
    """The status (0: the server closed the connection without an answer) and the body of what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        data = sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split(b" ", 2)[1]) if data else 0), body


def test_bad_inputs_get_clear_4xx(stack: SecureStack, obs: Observations) -> None:
    seen = []
    for name, path, content, headers in BAD_INPUTS:
        resp = _send(stack, path, content, headers)  # a transport error (reset, hang) is a failure too
        body = resp.json()
        seen.append((name, resp.status_code, body.get("error", {}).get("code") if "error" in body else "ok"))
        if name == "text/plain content type":  # a valid body: served whatever the content type says
            assert resp.status_code == 200, resp.text
            continue
        assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text[:300])
        assert set(body) == {"error"} and body["error"]["message"], (name, body)
        # The engine's own refusals too (vLLM writes its status as the code): our codes are strings.
        assert isinstance(body["error"]["code"], str) and body["error"]["type"].endswith("_error"), (name, body)
    more = [  # the admin API too
        ("register: model_name not a string", "POST", "/v1/models/register", {"alias": "x", "model_name": 5}),
        ("register: unknown field", "POST", "/v1/models/register", {"alias": "x", "model_name": "o/x", "gpu": 1}),
        (
            "register: min_replicas > max_replicas",
            "POST",
            "/v1/models/register",
            {"alias": "x", "model_name": "o/x", "min_replicas": 3, "max_replicas": 1},
        ),
        ("patch: wrong type", "PATCH", f"/v1/models/{ALIAS}", {"max_replicas": "many"}),
        ("patch: unknown field", "PATCH", f"/v1/models/{ALIAS}", {"model_name": "o/other"}),
        ("path alias with a slash", "GET", "/v1/models/a%2Fb", None),
        ("path alias of 300 characters", "DELETE", "/v1/models/" + "a" * 300, None),
    ]
    for name, method, path, body in more:
        resp = httpx.request(method, stack.router.url + path, json=body, headers=bearer(ADMIN_KEY), timeout=30)
        seen.append((name, resp.status_code, resp.json()["error"]["code"]))
        assert 400 <= resp.status_code < 500, (name, resp.text)
    for name, raw in RAW_REQUESTS:
        status, body = raw_answer(stack.router.port, raw)
        seen.append((name, status, "connection closed" if not status else "answered" if status < 400 else "refused"))
        assert status < 500, (name, status)  # refused (4xx), closed, or (a long header) simply served
        if status >= 400:  # refused in the API's shape, even by the HTTP parser (dataplane/server_protocol.py)
            assert json.loads(body)["error"]["message"], (name, body)
    obs.record("bad_inputs", seen)
    # Nothing stuck: the engine serves at once.
    assert running_requests(stack) == 0
    assert stack.openai().completions.create(model=ALIAS, prompt="x", max_tokens=2).choices


def test_streams_dropped_early_do_not_leave_the_engine_busy(stack: SecureStack, obs: Observations) -> None:
    body = {
        "model": ALIAS,
        "prompt": "Once upon a time",
        "max_tokens": MAX_MODEL_LEN - 16,
        "stream": True,
        "ignore_eos": True,
    }
    drops = []
    generated = _engine(stack, "vllm:generation_tokens_total")
    for _ in range(5):
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", stack.router.url + "/v1/completions", json=body, headers=bearer(API_KEY)) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert "choices" in first
        drops.append(time.monotonic())  # the connection is closed here, mid-stream
    # Long enough for the streams to end by themselves: what decides is the tokens made for clients that left (a
    # few each with the abort, all of their 2,032 without), not how soon the engine was idle.
    start = time.monotonic()
    while running_requests(stack) > 0 and time.monotonic() - start < 120:
        time.sleep(0.1)
    settle = time.monotonic() - start
    assert running_requests(stack) == 0
    made = _engine(stack, "vllm:generation_tokens_total") - generated
    assert made < len(drops) * (MAX_MODEL_LEN - 16) / 4, f"the engine made {made:.0f} tokens for clients that left"
    # Streaming still works end to end, and the engine answers at once: the stream runs to its end (its usage event
    # last, 4 tokens). Not a count of events: vLLM sends tokens made before its server wrote them in one event (a CI
    # run under load saw all 4 in one).
    options = {"include_usage": True}
    chunks = list(
        stack.openai().completions.create(model=ALIAS, prompt="x", max_tokens=4, stream=True, stream_options=options)
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 4, chunks
    obs.record("dropped_streams", {"count": len(drops), "engine_idle_after_s": round(settle, 2), "tokens": made})


# ------------------------------------------------------------------------------------------ schemathesis

NEGATIVE_ONLY = {("PUT", "/engines"), ("POST", "/workers/register")}
WORKER_CALLS = {"/workers/register", "/workers/heartbeat"}
INFERENCE = {"/v1/chat/completions", "/v1/completions"}
_LENGTHS = {"max_tokens", "max_completion_tokens"}


def _protected(case: Any) -> bool:
    """Cases that would remove the real model or impersonate the real worker."""
    params = case.path_parameters or {}
    if params.get("alias") == ALIAS and case.method.upper() in ("DELETE", "PATCH"):
        return True
    body = case.body if isinstance(case.body, dict) else {}
    return body.get("worker_id") == "w1"


class Fuzzer:
    """Runs schemathesis-generated cases of one API against a live service and tallies the answers."""

    def __init__(self, base_url: str, headers: dict[str, str], worker_calls: dict[str, str] | None = None) -> None:
        import requests

        self.base_url, self.headers = base_url, headers
        self.worker_calls = worker_calls or headers  # credential of the worker-facing routes (a router's pass-on)
        self.session = requests.Session()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.documented_503 = 0
        self.impossible = 0

    def send(self, op: Any, mode: Any, case: Any) -> None:
        import requests

        if _protected(case):
            return
        if op.path in INFERENCE and isinstance(case.body, dict) and zlib.crc32(repr(case.body).encode()) % 3:
            case.body["model"] = ALIAS  # most cases reach the real engine, not just the alias check
        if op.path == "/v1/chat/completions" and isinstance(case.body, dict) and not _LENGTHS & case.body.keys():
            # vLLM's chat default is the rest of the context: 20 such cases made 47 s of the module's 140, and the
            # length of a generation is not what the fuzzing looks at (the handling of what it sends is).
            case.body["max_completion_tokens"] = 16
        if op.path == "/routing" and isinstance(case.query, dict):
            case.query["timeout"] = 0  # a long-poll would only wait
        try:
            headers = self.worker_calls if op.path in WORKER_CALLS else self.headers
            resp = case.call(base_url=self.base_url, headers=headers, session=self.session, timeout=60)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, ValueError):
            self.statuses[0] += 1  # not sendable over HTTP at all
            return
        self.statuses[resp.status_code] += 1
        if resp.status_code == 503:
            code = (resp.json().get("error") or {}).get("code")
            if code in DOCUMENTED_503 and resp.headers.get("retry-after"):
                self.documented_503 += 1
                return
        if resp.status_code >= 500:
            self.failures.append(
                f"{op.method.upper()} {op.path} {mode.value}: {resp.status_code} {resp.text[:300]}"
                f" <- {case.path_parameters} {case.query} {str(case.body)[:300]}"
            )

    def run(self, op: Any, mode: Any, examples: int) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis.errors import Unsatisfiable

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            self.send(op, mode, case)

        try:
            run()
        except Unsatisfiable:
            self.impossible += 1  # no invalid input exists for an operation without parameters


def fuzz(
    base_url: str,
    headers: dict[str, str],
    examples: int,
    inference_examples: int,
    worker_calls: dict[str, str] | None = None,
) -> dict[str, Any]:
    import schemathesis
    from schemathesis import GenerationMode

    raw = httpx.get(f"{base_url}/openapi.json", headers=headers, timeout=10).json()
    fuzzer = Fuzzer(base_url, headers, worker_calls)
    operations = 0
    for result in schemathesis.openapi.from_dict(raw).get_all_operations():
        op = result.ok()
        operations += 1
        negative_only = (op.method.upper(), op.path) in NEGATIVE_ONLY
        modes = [GenerationMode.NEGATIVE] if negative_only else [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        for mode in modes:
            fuzzer.run(op, mode, inference_examples if op.path in INFERENCE else examples)
    return {
        "operations": operations,
        "cases": sum(fuzzer.statuses.values()),
        "statuses": dict(sorted(fuzzer.statuses.items())),
        "documented_503": fuzzer.documented_503,
        "negative_impossible": fuzzer.impossible,
        "failures": fuzzer.failures,
    }


@pytest.mark.parametrize(
    ("service", "examples", "inference_examples"), [("router", 15, 25), ("worker", 15, 25), ("manager", 15, 0)]
)
def test_fuzz_from_openapi_has_no_server_errors(
    stack: SecureStack, obs: Observations, service: str, examples: int, inference_examples: int
) -> None:
    url, headers = {
        "router": (stack.router.url, bearer(ADMIN_KEY)),
        "worker": (stack.workers["w1"].url, bearer(WORKER_TOKEN)),
        "manager": (stack.manager.url, bearer(ADMIN_KEY)),
    }[service]
    start = time.monotonic()
    # Worker-facing routes take the worker token (a router passes them on; the manager takes the admin key too).
    result = fuzz(url, headers, examples, inference_examples, bearer(WORKER_TOKEN) if service == "router" else None)
    result["seconds"] = round(time.monotonic() - start, 1)
    obs.record(f"schemathesis_{service}", result)
    assert result["cases"] > 0 and not result["failures"], "\n".join(result["failures"][:20])
    # The fuzzing left the real model serving and the engine idle.
    assert stack.model(ALIAS)["state"] == "ready"
    assert stack.openai().completions.create(model=ALIAS, prompt="x", max_tokens=2).choices
    assert running_requests(stack) == 0
