"""A streaming request held through a cold start (router/hold_stream.py): SSE comments while it waits, then the
model's events in the same response; errors after the stream started are error events, before it their own status;
a client that leaves a held stream leaves the queue; the official clients parse such a stream.

The router is the real app (`create_router_app`) on a real uvicorn server, with the real relay; the manager is a
stand-in whose routing table the test publishes, and the replica a stand-in upstream server that answers as vLLM
does (an event stream, or an error). The real-engine test is tests/test_cold_start_stream.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest
from serverless_vllm.config import AuthSettings, RouterSettings
from serverless_vllm.errors import APIError
from serverless_vllm.router.app import create_router_app
from serverless_vllm.schemas import DemandReport, Endpoint, ModelRoute, ModelState, RoutingTable
from serverless_vllm.testing.ports import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .served import served

ALIAS = "m"
CHAT = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "stream": True}
WORDS = ["Once", " upon", " a", " time"]


# --------------------------------------------------------------------------- stand-ins


class StandInManager:
    """The manager as the router sees it (ManagerAPI), reduced to what the request path asks: the routing table
    (published by the test, long-polled by the router) and the registry's answer for an alias."""

    def __init__(self) -> None:
        self.table = RoutingTable(version=1, epoch="e", models={ALIAS: ModelRoute(state=ModelState.COLD)})
        self._changed = asyncio.Event()
        self.reports: list[DemandReport] = []

    def publish(self, route: ModelRoute | None) -> None:
        models = {ALIAS: route} if route is not None else {}
        self.table = RoutingTable(version=self.table.version + 1, epoch="e", models=models)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_routing(self, after_version: int, epoch: str, timeout: float) -> RoutingTable:
        if epoch == self.table.epoch and after_version >= self.table.version:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass
        return self.table

    async def get_model(self, alias: str) -> Any:
        raise APIError(404, f"The model '{alias}' does not exist", "model_not_found")

    async def report_demand(self, report: DemandReport) -> None:
        self.reports.append(report)

    async def close(self) -> None:
        pass


@dataclass
class Upstream:
    """The replica: answers chat and Messages requests with vLLM's event streams, or with an error when `error`."""

    error: tuple[int, dict[str, Any]] | None = None
    requests: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._chat, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/responses/{rid}", self._stored, methods=["GET"]),
            ]
        )

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(request.url.path)
        if self.error is not None:
            return JSONResponse(self.error[1], status_code=self.error[0])
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(WORDS)}
            return JSONResponse({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": message}]})

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            event = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": ALIAS,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(event)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for word in WORDS:
                yield chunk({"content": word})
            yield chunk({}, "stop")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _messages(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": ALIAS,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 0},
        }
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            *(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
                )
                for w in WORDS
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        body = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)
        return Response(body, media_type="text/event-stream")

    async def _responses(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        created = {"type": "response.created", "response": {"id": "resp_held1", "status": "in_progress"}}
        return Response(f"event: response.created\ndata: {json.dumps(created)}\n\n", media_type="text/event-stream")

    async def _stored(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        return JSONResponse({"id": request.path_params["rid"], "object": "response", "status": "completed"})


@dataclass
class Stack:
    manager: StandInManager
    upstream: Upstream
    upstream_url: str
    url: str

    def ready(self, url: str | None = None) -> None:
        """Publish a ready replica (the stand-in upstream, or `url`)."""
        endpoint = Endpoint(replica_id=f"r-{url or 'up'}", worker_id="w1", url=url or self.upstream_url)
        self.manager.publish(ModelRoute(state=ModelState.READY, endpoints=[endpoint]))

    def later(self, seconds: float, action: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(seconds, action)

    async def routed(self, state: ModelState) -> None:
        """Wait until the router's table (its /v1/models) has the model in `state`."""
        async with httpx.AsyncClient() as client:
            for _ in range(500):
                models = (await client.get(f"{self.url}/v1/models")).json()["data"]
                if [m["state"] for m in models] == [state.value]:
                    return
                await asyncio.sleep(0.01)
        raise AssertionError(f"the router's table never had {ALIAS} {state}: {models}")

    async def queued(self) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{self.url}/metrics")).text
        match = re.search(rf'^svllm_router_queued_requests\{{model="{ALIAS}"\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    async def metric(self, name: str) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{self.url}/metrics")).text
        match = re.search(rf"^{name}\{{[^}}]*model=\"{ALIAS}\"[^}}]*\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


@asynccontextmanager
async def stack(**settings: Any) -> AsyncIterator[Stack]:
    manager, upstream = StandInManager(), Upstream()
    defaults: dict[str, Any] = {"hold_keepalive_s": 0.2, "report_interval_s": 0.1}
    app = create_router_app(RouterSettings(**{**defaults, **settings}), lambda: manager, auth=AuthSettings(mode="off"))
    async with served(upstream.app()) as (_, up_url), served(app) as (_, url):
        yield Stack(manager, upstream, up_url, url)


async def raw_stream(url: str, path: str = "/v1/chat/completions", body: dict[str, Any] = CHAT) -> httpx.Response:
    """The response with its whole body read (`.text`), as the bytes came."""
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{url}{path}", json=body)


def before_first_data(text: str) -> list[str]:
    return [line for line in text.split("\n\n")[: _first_data(text)] if line]


def _first_data(text: str) -> int:
    blocks = text.split("\n\n")
    return next((i for i, b in enumerate(blocks) if b.startswith(("data:", "event:"))), len(blocks))


def data_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data:")]


COMMENT = re.compile(rf"^: loading model '{ALIAS}', \d+ s(, ready in about \d+ s)?$")


# --------------------------------------------------------------------------- the stream


async def test_a_held_stream_gets_comments_then_the_models_events() -> None:
    async with stack() as s:
        s.later(0.9, s.ready)
        started = time.monotonic()
        response = await raw_stream(s.url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        comments = before_first_data(response.text)
        assert len(comments) >= 3 and all(COMMENT.match(c) for c in comments), comments  # at 0.2 s, then every 0.2 s
        events = data_events(response.text)
        assert events[-1] == "[DONE]"
        content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert content == "".join(WORDS)
        assert not any(line.startswith(":") for line in response.text.split("\n\n")[_first_data(response.text) :])
        assert time.monotonic() - started >= 0.9
        assert await s.queued() == 0
        # The time to first token is the model's first event, not the first comment.
        assert await s.metric("svllm_time_to_first_token_seconds_sum") >= 0.6  # comments began at 0.2 s


async def test_the_openai_client_parses_a_held_stream() -> None:
    async with stack() as s:
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        s.later(0.7, s.ready)
        stream = await client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(WORDS)
        assert chunks[-1].choices[0].finish_reason == "stop"
        await client.close()


async def test_the_anthropic_client_parses_a_held_messages_stream() -> None:
    async with stack() as s:
        client = anthropic.AsyncAnthropic(base_url=s.url, api_key="unused", max_retries=0)
        s.later(0.7, s.ready)
        stream = await client.messages.create(
            model=ALIAS, max_tokens=8, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        texts = [e.delta.text async for e in stream if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        assert "".join(texts) == "".join(WORDS)
        assert s.upstream.requests == ["/v1/messages"]
        await client.close()


async def test_the_comments_say_when_the_model_is_expected_ready() -> None:
    async with stack() as s:
        s.manager.publish(ModelRoute(state=ModelState.LOADING, ready_at=time.time() + 30))
        await s.routed(ModelState.LOADING)  # the router's long-poll brought it
        s.later(0.5, s.ready)
        comments = before_first_data((await raw_stream(s.url)).text)
        assert comments and all(re.search(r", ready in about (29|30) s$", c) for c in comments), comments


async def test_a_stream_started_while_held_that_fails_over_to_another_replica() -> None:
    """The replica picked first refuses before answering: the stream holds on (more comments) for another one."""
    async with stack() as s:
        dead = f"http://127.0.0.1:{free_port()}"
        # The stream itself says when to publish (not a timer: a loaded machine sends fewer comments in a time): the
        # dead replica after the first comment, the live one after three more comments.
        blocks: list[str] = []
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", f"{s.url}/v1/chat/completions", json=CHAT) as response,
        ):
            assert response.status_code == 200
            buffer = ""
            async for text in response.aiter_text():
                buffer += text
                *done, buffer = buffer.split("\n\n")
                for block in done:
                    blocks.append(block)
                    comments = [b for b in blocks if b.startswith(":")]
                    if block.startswith(":") and len(comments) == 1:
                        s.ready(dead)
                    elif block.startswith(":") and len(comments) == 4:
                        s.ready()
        text = "\n\n".join(blocks) + "\n\n"
        # Held past the dead replica (an error there would have ended the stream), then the live one's events.
        assert len(before_first_data(text)) >= 4, blocks  # more if the live one took a comment longer to arrive
        assert data_events(text)[-1] == "[DONE]"
        assert s.upstream.requests == ["/v1/chat/completions"]


async def test_a_held_responses_stream_remembers_its_replica() -> None:
    async with stack() as s:
        s.later(0.5, s.ready)
        body = {"model": ALIAS, "input": "hi", "stream": True}
        response = await raw_stream(s.url, "/v1/responses", body)
        assert before_first_data(response.text) and "resp_held1" in response.text
        async with httpx.AsyncClient() as client:
            stored = await client.get(f"{s.url}/v1/responses/resp_held1")
        assert stored.status_code == 200 and stored.json()["id"] == "resp_held1"
        assert s.upstream.requests == ["/v1/responses", "/v1/responses/resp_held1"]


# --------------------------------------------------------------------------- errors once the stream has started


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (ModelRoute(state=ModelState.FAILED, error="out of memory"), "model_failed"),
        (None, "model_not_found"),  # deleted while its requests were held
    ],
)
async def test_a_hold_that_fails_after_the_stream_started_ends_it_with_an_error_event(
    outcome: ModelRoute | None, code: str
) -> None:
    async with stack() as s:
        s.later(0.5, lambda: s.manager.publish(outcome))
        response = await raw_stream(s.url)
        assert response.status_code == 200 and before_first_data(response.text)
        events = data_events(response.text)
        assert len(events) == 1, events
        error = json.loads(events[0])["error"]
        assert error["code"] == code and error["message"]
        assert await s.queued() == 0


async def test_a_cold_start_timeout_after_the_stream_started_is_an_error_event() -> None:
    async with stack(cold_start_timeout_s=0.7) as s:
        response = await raw_stream(s.url)
        assert response.status_code == 200 and len(before_first_data(response.text)) >= 2
        error = json.loads(data_events(response.text)[0])["error"]
        assert error["code"] == "cold_start_timeout" and "did not become ready" in error["message"]
        # The openai client raises it.
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="did not become ready"):
            async for _ in stream:
                pass
        await client.close()


async def test_an_upstream_error_after_the_stream_started_is_an_error_event() -> None:
    async with stack() as s:
        s.upstream.error = (400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}})

        async def ready_once_streaming() -> None:
            # Timed from the hold, not from the request's send (seen in CI: a loaded machine sent it after a fixed
            # 0.5 s timer had made the model ready, and the error came as a plain 400). The router's first keep-alive
            # (0.2 s after the hold, on this same event loop) starts the stream before this timer ends.
            for _ in range(1000):
                if await s.queued() >= 1:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            s.ready()

        readying = asyncio.create_task(ready_once_streaming())
        response = await raw_stream(s.url)
        await readying
        assert response.status_code == 200
        error = json.loads(data_events(response.text)[0])["error"]
        assert error["message"] == "max_tokens is too large"


async def test_messages_errors_after_the_stream_started_are_anthropic_error_events() -> None:
    async with stack(cold_start_timeout_s=0.5) as s:
        body = {"model": ALIAS, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        response = await raw_stream(s.url, "/v1/messages", body)
        assert response.status_code == 200 and before_first_data(response.text)
        block = response.text.split("\n\n")[_first_data(response.text)]
        name, data = block.split("\n")
        assert name == "event: error"
        assert json.loads(data.removeprefix("data: "))["error"]["type"] == "overloaded_error"
        client = anthropic.AsyncAnthropic(base_url=s.url, api_key="unused", max_retries=0)
        stream = await client.messages.create(
            model=ALIAS, max_tokens=8, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(anthropic.APIError, match="did not become ready"):
            async for _ in stream:
                pass
        await client.close()


# --------------------------------------------------------------------------- nothing started: as before


async def test_errors_within_the_first_interval_keep_their_status() -> None:
    async with stack(hold_keepalive_s=5) as s:
        s.later(0.3, lambda: s.manager.publish(ModelRoute(state=ModelState.FAILED, error="out of memory")))
        response = await raw_stream(s.url)
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_failed"
        assert response.headers["retry-after"] == "30"
    async with stack(max_queue_per_model=0) as s:
        response = await raw_stream(s.url)
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"


async def test_a_model_ready_within_the_first_interval_streams_without_comments() -> None:
    async with stack(hold_keepalive_s=5) as s:
        s.later(0.3, s.ready)
        response = await raw_stream(s.url)
        assert response.status_code == 200 and not before_first_data(response.text)
        assert data_events(response.text)[-1] == "[DONE]"


async def test_a_ready_model_and_a_held_plain_request_get_no_comments() -> None:
    async with stack() as s:
        s.later(0.7, s.ready)
        response = await raw_stream(s.url, body={**CHAT, "stream": False})  # held 0.7 s: a plain JSON answer
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
        response = await raw_stream(s.url)  # ready now: relayed at once
        assert response.text.startswith("data: ") and data_events(response.text)[-1] == "[DONE]"


async def test_zero_interval_turns_comments_off() -> None:
    async with stack(hold_keepalive_s=0) as s:
        s.later(0.7, s.ready)
        response = await raw_stream(s.url)
        assert response.status_code == 200 and response.text.startswith("data: ")


async def test_a_cold_start_timeout_says_when_to_retry_from_the_expected_ready_time() -> None:
    async with stack(cold_start_timeout_s=0.3, hold_keepalive_s=5) as s:
        response = await raw_stream(s.url)
        assert response.status_code == 503 and response.headers["retry-after"] == "10"  # nothing known
        s.manager.publish(ModelRoute(state=ModelState.LOADING, ready_at=time.time() + 42.5))
        await asyncio.sleep(0.1)
        response = await raw_stream(s.url)
        assert response.json()["error"]["code"] == "cold_start_timeout"
        assert int(response.headers["retry-after"]) in (42, 43)


# --------------------------------------------------------------------------- a client that leaves


async def drained(s: Stack) -> bool:
    """Whether the model's queue at the router empties within a second."""
    for _ in range(20):
        if await s.queued() == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_client_that_leaves_a_held_stream_leaves_the_queue() -> None:
    async with stack(hold_keepalive_s=0.3) as s, httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{s.url}/v1/chat/completions", json=CHAT) as response:
            assert response.status_code == 200
            assert (await anext(response.aiter_raw())).startswith(b": loading model")
            assert await s.queued() == 1
        assert await drained(s)
        s.ready()
        await asyncio.sleep(0.2)
        assert s.upstream.requests == []  # the request that left did not go on to the replica


async def test_a_client_that_leaves_before_the_first_comment_leaves_the_queue() -> None:
    async with stack(hold_keepalive_s=5) as s, httpx.AsyncClient(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{s.url}/v1/chat/completions", json=CHAT)
        assert await drained(s)
        s.ready()
        await asyncio.sleep(0.2)
        assert s.upstream.requests == []
