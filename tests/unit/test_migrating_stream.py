"""A stream cut mid-generation goes on on another replica (router/migration.py), through the real Forwarder, the
real pooled client and a real RouteTable; the replicas are `DyingReplica`s, stand-ins that stream as vLLM does
(compact JSON, usage on every event when asked) and die on purpose after a number of tokens: the connection
dropped (a worker killed), or the worker's `stream_interrupted` event (its engine killed). The real-engine test is
tests/test_stream_migration.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from serverless_vllm.config import RouterSettings
from serverless_vllm.dataplane.body import InferenceRequest
from serverless_vllm.dataplane.endpoints import BY_PATH
from serverless_vllm.dataplane.relay import UpstreamClient
from serverless_vllm.router.proxy import Forwarder
from serverless_vllm.router.sync import ManagerSync
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelRoute, ModelState, RoutingTable
from starlette.responses import StreamingResponse

ALIAS = "m"
DROP, INTERRUPT, REFUSE = "drop", "interrupt", "refuse"


class DyingReplica:
    """A vLLM-like replica that streams `max_tokens` tokens `tok0`, `tok1`, ... unless told to die after `die_after`
    of them (`how`: drop the connection, or end with the worker's stream_interrupted event), or to refuse (400)."""

    def __init__(self, name: str, die_after: int | None = None, how: str = DROP) -> None:
        self.name, self.die_after, self.how = name, die_after, how
        self.bodies: list[dict[str, Any]] = []
        self.asked = asyncio.Event()  # a request came
        self.left = asyncio.Event()  # a client closed its connection before the end
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> DyingReplica:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def endpoint(self, replica_id: str | None = None) -> Endpoint:
        return Endpoint(replica_id=replica_id or self.name, worker_id=self.name, url=f"http://127.0.0.1:{self.port}")

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        body = json.loads(await reader.readexactly(length))
        self.bodies.append(body)
        self.asked.set()
        if self.how == REFUSE:
            error = b'{"error":{"message":"too long","type":"BadRequestError","code":400}}'
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(error)
                + error
            )
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        chat = "messages" in body
        usage = (body.get("stream_options") or {}).get("continuous_usage_stats")
        frame = {"id": f"id-{self.name}", "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": len(self.name), "model": ALIAS}  # fmt: skip
        total = body.get("max_tokens", 16)
        for i in range(total):
            if i == self.die_after:
                if self.how == DROP:  # closed with the response unfinished, as by a worker's death
                    writer.close()
                    return
                cut = {
                    "error": {"message": "cut", "type": "upstream_error", "param": None, "code": "stream_interrupted"}
                }
                self._event(writer, cut)
                break
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if i == total - 1 else None}
            choice.update({"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "})
            event = {**frame, "choices": [choice]}
            if usage:
                event["usage"] = {"prompt_tokens": 3, "total_tokens": 4 + i, "completion_tokens": i + 1}
            self._event(writer, event)
            try:
                await writer.drain()
            except ConnectionError:
                self.left.set()
                return
            if reader.at_eof():
                self.left.set()
                return
        else:
            self._event(writer, {**frame, "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 3 + total,
                                                                   "completion_tokens": total}})  # fmt: skip
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    @staticmethod
    def _event(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))


@asynccontextmanager
async def forwarder(*endpoints: Endpoint, migration: bool = True) -> AsyncIterator[tuple[Forwarder, RouteTable]]:
    table = RouteTable()
    publish(table, 1, *endpoints)
    client = UpstreamClient(connect_timeout_s=2)
    settings = RouterSettings(stream_migration=migration, cold_start_timeout_s=5)
    sync = ManagerSync(None, table, "router-1", 1.0)  # type: ignore[arg-type]  # never started
    try:
        yield Forwarder(settings, table, sync, None, client), table  # type: ignore[arg-type]
    finally:
        await client.close()


def first_ready(table: RouteTable) -> None:
    """The table picks the first ready replica not excluded (`a` first), not one of two at random."""

    def pick(alias: str, exclude: frozenset[str] = frozenset(), key: Any = None) -> Endpoint | None:
        route = table.route(alias)
        return next((e for e in route.endpoints if e.replica_id not in exclude), None) if route else None

    table.pick = pick  # type: ignore[method-assign]


def publish(table: RouteTable, version: int, *endpoints: Endpoint) -> None:
    route = ModelRoute(state=ModelState.READY if endpoints else ModelState.LOADING, endpoints=list(endpoints))
    table.update(RoutingTable(version=version, epoch="e", models={ALIAS: route}))


async def stream(fwd: Forwarder, payload: dict[str, Any]) -> list[Any]:
    """Every event the client gets (decoded JSON, or the string `[DONE]`)."""
    path = "/v1/chat/completions" if "messages" in payload else "/v1/completions"
    request = InferenceRequest(BY_PATH[path], json.dumps(payload).encode(), payload, ALIAS, "application/json")
    response = await fwd.forward(request)
    assert isinstance(response, StreamingResponse)
    data = b"".join([bytes(c) async for c in response.body_iterator])
    return [e[6:].decode() if e == b"data: [DONE]" else json.loads(e[6:]) for e in data.split(b"\n\n") if e]


def chat(max_tokens: int = 20, **more: Any) -> dict[str, Any]:
    return {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": max_tokens,
            **more}  # fmt: skip


def text_of(events: list[Any]) -> str:
    pieces = []
    for e in events:
        for c in e.get("choices", []) if isinstance(e, dict) else []:
            pieces.append(c["delta"].get("content", "") if "delta" in c else c["text"])
    return "".join(pieces)


async def test_a_chat_stream_whose_worker_dies_goes_on_on_the_other_replica() -> None:
    a, b = await DyingReplica("a", die_after=5).start(), await DyingReplica("b").start()
    async with forwarder(a.endpoint(), b.endpoint()) as (fwd, _):
        first_ready(fwd.table)
        events = await stream(fwd, chat(stream_options={"include_usage": True}))
    sent = "".join(f"tok{i} " for i in range(5))
    (resumed,) = b.bodies
    assert resumed["messages"][-1] == {"role": "assistant", "content": sent}
    assert (resumed["continue_final_message"], resumed["add_generation_prompt"], resumed["max_tokens"]) == (
        True,
        False,
        15,
    )
    assert text_of(events) == sent + "".join(f"tok{i} " for i in range(15))
    assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
    assert {(e["id"], e["created"]) for e in events[:-1]} == {("id-a", 1)}
    assert events[-2]["usage"] == {"prompt_tokens": 3, "total_tokens": 23, "completion_tokens": 20}
    assert all("usage" not in e for e in events[:-2])
    await a.close()
    await b.close()


async def test_a_completion_whose_engine_dies_goes_on_and_a_lone_replica_is_waited_for() -> None:
    """One replica: its engine dies (the worker says so) and comes back under the same replica id."""
    a = await DyingReplica("a", die_after=4, how=INTERRUPT).start()
    async with forwarder(a.endpoint()) as (fwd, table):

        async def restart() -> None:
            await a.asked.wait()
            await asyncio.sleep(0.2)
            publish(table, 2)  # the worker reported its engine gone
            a.die_after = None
            await asyncio.sleep(0.2)
            publish(table, 3, a.endpoint())  # and ready again, same replica id

        restarting = asyncio.ensure_future(restart())
        events = await stream(fwd, {"model": ALIAS, "prompt": "Once", "stream": True, "max_tokens": 10})
        await restarting
    assert [b["prompt"] for b in a.bodies] == ["Once", "Once" + "".join(f"tok{i} " for i in range(4))]
    assert a.bodies[1]["max_tokens"] == 6
    assert text_of(events) == "".join(f"tok{i} " for i in range(4)) + "".join(f"tok{i} " for i in range(6))
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])  # none asked: none sent
    await a.close()


@pytest.mark.parametrize(
    ("payload", "migration"),
    [(chat(), False), (chat(n=2), True), (chat(logprobs=True), True)],
    ids=["migration off", "n=2", "logprobs"],
)
async def test_what_is_not_continued_is_cut_with_an_error_event(payload: dict[str, Any], migration: bool) -> None:
    a, b = await DyingReplica("a", die_after=3).start(), await DyingReplica("b").start()
    async with forwarder(a.endpoint(), b.endpoint(), migration=migration) as (fwd, _):
        first_ready(fwd.table)
        events = await stream(fwd, payload)
    assert b.bodies == [] and a.bodies[0] == payload  # sent as it came (no usage asked of the engine)
    assert events[-1]["error"]["code"] == "stream_interrupted"
    assert text_of(events) == "tok0 tok1 tok2 "
    await a.close()
    await b.close()


async def test_a_continuation_the_engine_refuses_ends_the_stream_with_its_message() -> None:
    a, b = await DyingReplica("a", die_after=3).start(), await DyingReplica("b", how=REFUSE).start()
    async with forwarder(a.endpoint(), b.endpoint()) as (fwd, _):
        first_ready(fwd.table)
        events = await stream(fwd, chat())
    assert len(b.bodies) == 1
    assert events[-1]["error"]["code"] == "stream_interrupted" and "too long" in events[-1]["error"]["message"]
    await a.close()
    await b.close()


async def test_a_client_that_leaves_mid_stream_closes_the_upstream_and_nothing_is_continued() -> None:
    a, b = await DyingReplica("a").start(), await DyingReplica("b").start()
    async with forwarder(a.endpoint(), b.endpoint()) as (fwd, table):
        first_ready(table)
        payload = chat(max_tokens=100000)
        request = InferenceRequest(BY_PATH["/v1/chat/completions"], json.dumps(payload).encode(), payload, ALIAS, "")
        response = await fwd.forward(request)
        assert isinstance(response, StreamingResponse)
        iterator = response.body_iterator
        assert b"tok0" in bytes(await iterator.__anext__())  # type: ignore[attr-defined]
        await iterator.aclose()  # type: ignore[attr-defined]  # as Starlette does when the client goes
        assert a.left.is_set() or await asyncio.wait_for(a.left.wait(), 5) is True
        assert table.in_flight(ALIAS) == 0
    assert len(a.bodies) == 1 and b.bodies == []
    await a.close()
    await b.close()
