"""Every endpoint of a vLLM model through the router, end to end: real CPU vLLM engines for three tasks (the tiny
Llama as a generate model and, with vLLM's pooling runner, as an embedding model; a tiny Llama sequence classifier),
driven with the official `openai` and `anthropic` clients.

What was verified about vLLM 0.32's CPU build here: the tiny random Llama serves embeddings, pooling, score and
rerank with `--runner pooling --convert embed`; classification needs a model with a classifier head (the causal LM
converted with `--convert classify` answered NaN), hence the tiny LlamaForSequenceClassification; Responses (stored
with VLLM_ENABLE_RESPONSES_API_STORE=1, streaming or not, previous_response_id), Messages and count_tokens,
tokenize, detokenize, and the render endpoints (behind `--enable-scale-out`) with the generate runner. Audio: no
speech model is made here (a tiny random Whisper needs a trained feature extractor and tokenizer); the multipart
path is tested against the real engine's answer for a text-only model (it has no transcription route), which the
worker turns into a clear 400.

The tests share one stack and run in file order (register, hold through cold starts, serve, refuse, abort).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .harness import Service, Stack, engine_metric, free_port, wait_until

GEN, EMB, CLS = "tiny", "emb", "cls"
M = [{"role": "user", "content": "hello there"}]
# float32: the CPU build's bf16 kernels once crashed on a first request of a few tokens (../shared/ENVIRONMENT.md).
# max_model_len 2048: long generations, so that a request that is not aborted is still running when checked.
SPEC = {"max_model_len": 2048, "dtype": "float32", "preload": False}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_classifier: Path) -> Iterator[Stack]:
    # The worker's default fork server (the harness turns it off elsewhere): several models start here, each forked.
    env = {"CPU_SLOTS": "2", "SCALE_DOWN_DELAY": "2", "ENGINE_FORK_SERVER": "1"}
    s = Stack(tmp_path_factory.mktemp("endpoints"), env=env).start(workers=2)
    try:
        models = ((GEN, tiny_model, "generate"), (EMB, tiny_model, "embed"), (CLS, tiny_classifier, "classify"))
        for alias, model, task in models:
            # Two replicas at most (the Responses test asks for both), and no second one for the cold-start burst.
            extra = {"max_replicas": 2, "target_concurrency": 64} if alias == GEN else {}
            body = {"alias": alias, "model_name": str(model), "task": task, **SPEC, **extra}
            resp = s.post("/v1/models/register", json=body)
            assert resp.status_code == 200, resp.text
        yield s
    finally:
        s.stop()


def post(stack: Stack, path: str, body: dict[str, Any], timeout: float = 600) -> httpx.Response:
    return httpx.post(f"{stack.router.url}{path}", json=body, timeout=timeout)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


def test_models_show_their_task(stack: Stack) -> None:
    listed = {m["id"]: m for m in stack.get("/v1/models").json()["data"]}
    assert {a: (m["task"], m["state"]) for a, m in listed.items()} == {
        GEN: ("generate", "cold"),
        EMB: ("embed", "cold"),
        CLS: ("classify", "cold"),
    }
    info = stack.model(EMB)
    assert info["task"] == "embed" and info["engine"]["task"] == "embed"


def _gauge(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _raw_post(stack: Stack, path: str, body: dict[str, Any]) -> socket.socket:
    """A client that sends a request and will leave without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", stack.router.port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def test_held_requests_whose_clients_leave_leave_the_queue(stack: Stack) -> None:
    """Held for a cold start, then gone: out of the router's queue (and its demand), each counted as a 499. What
    decides is how they left, not how soon: a hold that missed its client's departure would empty the queue too,
    once the engine is up, but as five requests served (200) to nobody."""
    metrics = lambda: stack.get("/metrics").text  # noqa: E731
    closed = lambda: _closed_requests(metrics(), "completions", GEN)  # noqa: E731
    before = closed()
    clients = [_raw_post(stack, "/v1/completions", {"model": GEN, "prompt": "x", "max_tokens": 2}) for _ in range(5)]
    wait_until(lambda: _gauge(metrics(), "svllm_router_queued_requests", GEN) == 5, 30, what="five held requests")
    for sock in clients:
        sock.close()
    wait_until(lambda: _gauge(metrics(), "svllm_router_queued_requests", GEN) == 0, 60, what="the queue emptied")
    assert closed() - before == 5


def _closed_requests(text: str, endpoint: str, model: str) -> float:
    """Requests the router counted as left by their clients (nginx's 499)."""
    line = rf'^svllm_requests_total\{{endpoint="{endpoint}",model="{model}",status="499"\}} (\S+)$'
    match = re.search(line, text, re.M)
    return float(match.group(1)) if match else 0.0


def _anthropic(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.router.url, api_key="unused", max_retries=0, timeout=600)


def _calls(stack: Stack) -> dict[str, Callable[[], Any]]:
    """One request per endpoint family, each checked for the shape its client expects."""
    client = stack.openai(timeout=600)

    def ok(path: str, body: dict[str, Any], check: Callable[[dict[str, Any]], bool]) -> Callable[[], Any]:
        def call() -> Any:
            resp = post(stack, path, body)
            assert resp.status_code == 200, (path, resp.text[:300])
            assert check(resp.json()), (path, resp.text[:300])
            return resp.json()

        return call

    return {
        # The generate model, by its own clients where they exist.
        "chat": lambda: client.chat.completions.create(model=GEN, messages=M, max_tokens=8).choices[0].message,
        "completion": lambda: client.completions.create(model=GEN, prompt="Once", max_tokens=8).choices[0].text,
        "responses": lambda: client.responses.create(model=GEN, input="hello", max_output_tokens=8).id,
        "messages": lambda: _anthropic(stack).messages.create(model=GEN, max_tokens=8, messages=M).content,
        "count_tokens": lambda: _anthropic(stack).messages.count_tokens(model=GEN, messages=M).input_tokens,
        "tokenize": ok("/tokenize", {"model": GEN, "prompt": "hello"}, lambda b: b["count"] > 0),
        "detokenize": ok("/detokenize", {"model": GEN, "tokens": [266, 358]}, lambda b: isinstance(b["prompt"], str)),
        "chat_render": ok("/v1/chat/completions/render", {"model": GEN, "messages": M}, lambda b: bool(b)),
        "completion_render": ok("/v1/completions/render", {"model": GEN, "prompt": "hi"}, lambda b: bool(b)),
        # The embedding model.
        "embeddings": lambda: client.embeddings.create(model=EMB, input=["a cat", "a dog"]).data,
        "pooling": ok("/pooling", {"model": EMB, "input": "hello"}, lambda b: len(b["data"]) == 1),
        "score": ok("/score", {"model": EMB, "text_1": "cat", "text_2": ["cat", "dog"]}, lambda b: len(b["data"]) == 2),
        "v1_score": ok("/v1/score", {"model": EMB, "text_1": "a", "text_2": "b"}, lambda b: len(b["data"]) == 1),
        "rerank": ok(
            "/rerank",
            {"model": EMB, "query": "cat", "documents": ["cat", "dog", "x"]},
            lambda b: len(b["results"]) == 3,
        ),
        "v1_rerank": ok("/v1/rerank", {"model": EMB, "query": "a", "documents": ["b"]}, lambda b: b["results"]),
        "v2_rerank": ok("/v2/rerank", {"model": EMB, "query": "a", "documents": ["b"]}, lambda b: b["results"]),
        "emb_tokenize": ok("/tokenize", {"model": EMB, "prompt": "hello"}, lambda b: b["count"] > 0),
        # The classifier.
        "classify": ok("/classify", {"model": CLS, "input": ["good", "bad"]}, lambda b: len(b["data"]) == 2),
    }


def _queue_waits(stack: Stack) -> dict[str, float]:
    text = stack.get("/metrics").text
    pattern = r'^svllm_router_queue_wait_seconds_count\{model="([^"]+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def test_every_endpoint_is_held_through_its_models_cold_start(stack: Stack) -> None:
    """Three models at zero replicas, every endpoint family at once: each request waits at the router while its
    model starts (one cold start per model), then is served with the answer its client expects."""
    calls = _calls(stack)
    before = _queue_waits(stack)
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        results = {name: future.result(timeout=900) for name, future in futures.items()}
    assert results["embeddings"] and len(results["embeddings"][0].embedding) == 128  # the tiny model's width
    assert results["responses"].startswith("resp_") and results["count_tokens"] > 0
    # Every one of them was held (the hold records its wait), and each model had exactly one replica started.
    waits = _queue_waits(stack)
    held = {GEN: 9, EMB: 8, CLS: 1}  # the requests of _calls, per model
    assert {a: waits.get(a, 0.0) - before.get(a, 0.0) for a in held} == {a: float(n) for a, n in held.items()}
    assert [len(stack.model(a)["replicas"]) for a in (GEN, EMB, CLS)] == [1, 1, 1]


@pytest.mark.parametrize(
    ("path", "body", "alias", "task"),
    [
        ("/v1/chat/completions", {"model": EMB, "messages": M}, EMB, "embed"),
        ("/v1/embeddings", {"model": GEN, "input": "x"}, GEN, "generate"),
        ("/classify", {"model": EMB, "input": "x"}, EMB, "embed"),
        ("/v1/messages", {"model": CLS, "max_tokens": 4, "messages": M}, CLS, "classify"),
    ],
)
def test_an_endpoint_the_models_task_cannot_serve_is_400(
    stack: Stack, path: str, body: dict[str, Any], alias: str, task: str
) -> None:
    resp = post(stack, path, body, timeout=30)
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]  # OpenAI's shape, or Anthropic's on /v1/messages: both have it here
    assert f"'{alias}'" in message and f"'{task}'" in message and path in message


def test_audio_upload_reaches_the_engine_and_a_text_model_is_a_clear_400(stack: Stack) -> None:
    audio = b"RIFF" + b"\0" * 4096
    resp = httpx.post(
        f"{stack.router.url}/v1/audio/transcriptions",
        data={"model": GEN, "language": "en"},
        files={"file": ("a.wav", audio, "audio/wav")},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["code"] == "unsupported_endpoint" and "/v1/audio/transcriptions" in err["message"]
    # Not multipart: 415; no file: 400; too large: 413 (the body limit), all before any engine.
    assert post(stack, "/v1/audio/translations", {"model": GEN}).status_code == 415
    no_file = httpx.post(f"{stack.router.url}/v1/audio/transcriptions", files={"model": (None, GEN)}, timeout=30)
    assert no_file.status_code == 400 and error_of(no_file)["details"] == {"param": "file"}
    huge = httpx.post(
        f"{stack.router.url}/v1/audio/transcriptions",
        data={"model": GEN},
        files={"file": ("a.wav", b"\0" * (9 * 1024 * 1024), "audio/wav")},
        timeout=60,
    )
    assert huge.status_code == 413 and error_of(huge)["code"] == "body_too_large"


def test_responses_streamed_and_retrieved(stack: Stack) -> None:
    client = stack.openai(timeout=120)
    events = list(client.responses.create(model=GEN, input="tell me", max_output_tokens=16, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    response_id = events[-1].response.id
    again = client.responses.retrieve(response_id)
    assert again.id == response_id and again.output
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve("resp_00000000deadbeef")
    assert err.value.body["code"] == "response_not_found"  # type: ignore[index]


def test_previous_response_id_follows_its_replica_across_two_workers(stack: Stack) -> None:
    resp = httpx.patch(f"{stack.router.url}/v1/models/{GEN}", json={"min_replicas": 2}, timeout=30)
    assert resp.status_code == 200, resp.text
    info = wait_until(
        lambda: (m := stack.model(GEN)) and sum(r["state"] == "ready" for r in m["replicas"]) == 2 and m,
        600,
        interval=1,
        what="two ready replicas",
    )
    assert len({r["worker_id"] for r in info["replicas"]}) == 2  # one on each worker
    client = stack.openai(timeout=120)
    # Chains of follow-ups: each turn must reach the replica that holds the previous one (vLLM answers 404
    # elsewhere), whatever the load balancer would have chosen; 2 chains x 4 turns.
    for chain in range(2):
        previous = client.responses.create(model=GEN, input=f"chain {chain}", max_output_tokens=4).id
        for turn in range(4):
            stream = turn % 2 == 1
            created = client.responses.create(
                model=GEN, input=f"turn {turn}", max_output_tokens=4, previous_response_id=previous, stream=stream
            )
            previous = list(created)[-1].response.id if stream else created.id
            assert client.responses.retrieve(previous).previous_response_id is not None
    # A second router has never seen these ids: it finds their replica by asking the replicas.
    port = free_port()
    other = Service(
        "router-2", ["router", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url],
        port, stack.env, stack.tmp,
    ).start()  # fmt: skip
    try:
        fresh = openai.OpenAI(base_url=f"{other.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert fresh.responses.retrieve(previous).id == previous
        follow = fresh.responses.create(model=GEN, input="more", max_output_tokens=4, previous_response_id=previous)
        assert follow.previous_response_id == previous
    finally:
        other.stop()


def _ready_engines(stack: Stack, alias: str) -> list[tuple[str, str]]:
    """(worker url, replica id) of each of the alias's ready engines, asked of the manager once."""
    return [
        (worker["url"], engine["replica_id"])
        for worker in stack.workers_by_id().values()
        for engine in worker["engines"]
        if engine["alias"] == alias and engine["state"] == "ready"
    ]


def _engines_sum(engines: list[tuple[str, str]], metric: str) -> float:
    """An engine metric summed over `engines`, as vLLM itself counts it (read through their workers only: a poll
    that asked the manager each time waited out its loop's stalls on a busy machine)."""
    return sum(engine_metric(url, replica, metric) for url, replica in engines)


def _in_flight(stack: Stack) -> float:
    return _gauge(stack.get("/metrics").text, "svllm_router_in_flight_requests", GEN)


def test_a_non_streamed_request_whose_client_leaves_is_aborted_in_the_engine(stack: Stack) -> None:
    """Non-streamed, so no byte reaches the client before the end: the router and the worker must notice the
    departure themselves. What decides is what the engine generated, not how soon it stopped: six requests of
    1,800 tokens each, left once they run, must end with far fewer tokens generated than asked for (the engine
    makes them in about 15 s here, all 10,800 without the abort; with it, a handful).

    Counted from the moment they left: of the tokens still to make then, the engine must make few (the abort's
    way down, router to worker to vLLM). A count from the start judged how fast the test saw the requests run too:
    a CI run whose manager stalled for 5 s saw them only when 10,531 of the 10,800 tokens were made."""
    bodies = {
        "/v1/completions": {"model": GEN, "prompt": "Once", "max_tokens": 1800, "ignore_eos": True},
        "/v1/chat/completions": {"model": GEN, "messages": M, "max_tokens": 1800, "ignore_eos": True},
    }
    asked = 6 * 1800
    # Its engines ready, so the list below is the one that serves the requests.
    assert stack.openai(timeout=120).completions.create(model=GEN, prompt="x", max_tokens=1).choices
    engines = _ready_engines(stack, GEN)
    tokens, running = "vllm:generation_tokens_total", "vllm:num_requests_running"
    for path, request in bodies.items():
        generated = _engines_sum(engines, tokens)
        socks = [_raw_post(stack, path, request) for _ in range(6)]
        wait_until(lambda: _engines_sum(engines, running) >= 1, 60, interval=0.05, what=f"{path} running")
        for sock in socks:
            sock.close()
        made_before = _engines_sum(engines, tokens) - generated  # read just after they left: includes the read
        assert made_before < asked / 2, f"{path}: {made_before:.0f} tokens made before the test saw them run"
        # Long enough for the generation to end by itself, so a missing abort is seen in the count, not a timeout.
        wait_until(lambda: _engines_sum(engines, running) == 0, 180, interval=0.05, what=f"{path} idle in the engine")
        made_after = _engines_sum(engines, tokens) - generated - made_before
        assert made_after < (asked - made_before) / 4, f"{path}: {made_after:.0f} tokens made after the clients left"
        # And the router let go of them: its in-flight count (load reports, backpressure) is back to 0.
        wait_until(lambda: _in_flight(stack) == 0, 10, interval=0.05, what="the router's in-flight count back to 0")


def test_anthropic_client_streams_and_sees_anthropic_errors(stack: Stack) -> None:
    client = _anthropic(stack)
    with client.messages.stream(model=GEN, max_tokens=8, messages=M) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and isinstance(text, str)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=4, messages=M)
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=GEN, max_tokens=0, messages=M)
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_the_engines_own_errors_reach_each_client_in_its_apis_shape(stack: Stack) -> None:
    """Errors only the engine finds (its request validation, a generation longer than the context): vLLM writes them
    OpenAI-like on every path, with a Python exception's name as the type; the worker rewrites them
    (worker/engine_errors.py)."""
    client = _anthropic(stack)
    with pytest.raises(anthropic.BadRequestError) as role:
        client.messages.create(model=GEN, max_tokens=4, messages=[{"role": "bogus", "content": "hi"}])  # type: ignore[misc,list-item]
    assert role.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0.role: Input should be 'user', 'assistant' or 'system'",
        },
    }
    with pytest.raises(anthropic.BadRequestError) as long:
        client.messages.create(model=GEN, max_tokens=100_000, messages=M)  # type: ignore[arg-type]
    error = long.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and "max_model_len=2048" in error["message"], error
    chat = openai.OpenAI(base_url=f"{stack.router.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as too_long:
        chat.chat.completions.create(model=GEN, messages=M, max_tokens=100_000)  # type: ignore[arg-type]
    assert (too_long.value.type, too_long.value.code) == ("invalid_request_error", "invalid_request")
    assert "max_model_len=2048" in too_long.value.message


def test_requests_are_counted_by_endpoint(stack: Stack) -> None:
    text = stack.get("/metrics").text
    counted = {
        (m.group(1), m.group(2))
        for m in re.finditer(r'^svllm_requests_total\{endpoint="([^"]+)",model="([^"]+)",status="200"\}', text, re.M)
    }
    assert {("embeddings", EMB), ("rerank", EMB), ("responses", GEN), ("messages", GEN), ("classify", CLS)} <= counted
