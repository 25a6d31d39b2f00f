"""Stored Responses at the router (router/responses.py), without engines: the bounded id -> replica map, and the
ResponsesRouter over a real RouteTable with fake replicas and a stand-in Forwarder whose answers the tests set."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from serverless_vllm.dataplane.body import InferenceRequest
from serverless_vllm.dataplane.endpoints import BY_PATH
from serverless_vllm.errors import APIError
from serverless_vllm.router.policy import RequestKey
from serverless_vllm.router.responses import ResponseMap, ResponsesRouter
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, KeyLimits, ModelRoute, ModelState, ModelTask, Priority, RoutingTable
from serverless_vllm.security.keys import ActiveKey
from starlette.responses import JSONResponse, Response, StreamingResponse

# =========================================================================== ResponseMap


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lookup(ids: ResponseMap, response_id: str) -> tuple[str, str] | None:
    """(alias, replica) of a response id, as the router finds it (its use counted), or None."""
    held = ids.held(response_id)
    return (held.alias, held.replica_id) if held is not None else None


def test_map_remembers_and_looks_up() -> None:
    ids = ResponseMap(max_ids=10, retention_s=60)
    assert lookup(ids, "resp_a") is None and len(ids) == 0
    ids.remember("resp_a", "m", "r1")
    ids.remember("resp_b", "other", "r2")
    assert lookup(ids, "resp_a") == ("m", "r1")
    assert lookup(ids, "resp_b") == ("other", "r2")
    assert lookup(ids, "resp_c") is None
    ids.remember("resp_a", "m", "r3")  # remembered again (a continuation landed elsewhere): the latest wins
    assert lookup(ids, "resp_a") == ("m", "r3") and len(ids) == 2


def test_map_evicts_the_least_recently_used_beyond_max_ids() -> None:
    ids = ResponseMap(max_ids=3, retention_s=60)
    for name in ("a", "b", "c"):
        ids.remember(f"resp_{name}", "m", "r1")
    assert lookup(ids, "resp_a") == ("m", "r1")  # used: now the most recent, b the least
    ids.remember("resp_d", "m", "r1")
    assert len(ids) == 3
    assert lookup(ids, "resp_b") is None
    assert [lookup(ids, f"resp_{n}") is not None for n in ("a", "c", "d")] == [True, True, True]
    ids.remember("resp_e", "m", "r1")  # the lookups above used a, c, d in that order: a goes
    assert lookup(ids, "resp_a") is None and len(ids) == 3


def test_map_forgets_an_id_unused_for_the_retention() -> None:
    clock = Clock()
    ids = ResponseMap(max_ids=10, retention_s=10, clock=clock)
    ids.remember("resp_a", "m", "r1")
    ids.remember("resp_b", "m", "r1")
    clock.now = 10.0
    assert lookup(ids, "resp_a") == ("m", "r1")  # exactly the retention: still kept
    clock.now = 10.5
    assert lookup(ids, "resp_b") is None  # unused for more than the retention: gone
    assert len(ids) == 1
    clock.now = 20.5
    assert lookup(ids, "resp_a") is None and len(ids) == 0


def test_map_lookup_refreshes_the_use_time() -> None:
    clock = Clock()
    ids = ResponseMap(max_ids=10, retention_s=10, clock=clock)
    ids.remember("resp_a", "m", "r1")
    for now in (8.0, 16.0, 24.0, 32.0):  # each lookup within the retention of the previous one
        clock.now = now
        assert lookup(ids, "resp_a") == ("m", "r1"), now
    clock.now = 42.5
    assert lookup(ids, "resp_a") is None


# =========================================================================== ResponsesRouter


def endpoint(replica_id: str) -> Endpoint:
    return Endpoint(replica_id=replica_id, worker_id=f"w-{replica_id}", url="http://127.0.0.1:9")


def table_with(models: dict[str, tuple[ModelTask, list[str]]]) -> RouteTable:
    table = RouteTable()
    table.update(
        RoutingTable(
            version=1,
            epoch="e",
            models={
                alias: ModelRoute(state=ModelState.READY, task=task, endpoints=[endpoint(r) for r in replicas])
                for alias, (task, replicas) in models.items()
            },
        )
    )
    return table


def stored(response_id: str, status: str = "completed") -> dict[str, Any]:
    return {"id": response_id, "object": "response", "status": status, "output": []}


class FakeForwarder:
    """Stands in for router/proxy.py's Forwarder: replicas that hold the responses in `held` (replica id -> ids),
    answers of POST /v1/responses set per replica, and every request sent recorded."""

    def __init__(self, held: dict[str, set[str]] | None = None) -> None:
        self.held = held or {}
        self.created: dict[str, Response] = {}  # replica id -> its answer to POST /v1/responses
        self.failing: set[str] = set()  # replicas that fail before answering (send returns None)
        self.next: tuple[Response, Endpoint] | None = None  # what forward answers, and the replica that did
        self.sent: list[tuple[str, str, str, str, bytes]] = []  # (method, path, alias, replica id, body)

    async def send(
        self, path: str, body: bytes, content_type: str, alias: str, endpoint: Endpoint, method: str = "POST"
    ) -> Response | None:
        self.sent.append((method, path, alias, endpoint.replica_id, body))
        replica = endpoint.replica_id
        if replica in self.failing:
            return None
        if method == "POST" and path == "/v1/responses":
            return self.created[replica]
        response_id = path.removeprefix("/v1/responses/").removesuffix("/cancel")
        if response_id not in self.held.get(replica, set()):
            return JSONResponse({"error": {"message": "not found", "code": "not_found"}}, status_code=404)
        if method == "POST" and path.endswith("/cancel"):
            return JSONResponse(stored(response_id, "cancelled"))
        return JSONResponse(stored(response_id))

    async def forward(
        self,
        request: InferenceRequest,
        affinity: RequestKey | None = None,
        served_by: Callable[[Endpoint], None] | None = None,
    ) -> Response:
        assert self.next is not None
        response, endpoint = self.next
        self.sent.append(("POST", request.endpoint.path, request.alias, endpoint.replica_id, request.body))
        if served_by is not None:
            served_by(endpoint)
        return response

    def asked(self, method: str = "GET") -> list[str]:
        """The replicas sent a `method` request, in order."""
        return [replica for m, _path, _alias, replica, _body in self.sent if m == method]


def responses_request(alias: str, **fields: Any) -> InferenceRequest:
    payload = {"model": alias, "input": "hi", **fields}
    return InferenceRequest(BY_PATH["/v1/responses"], json.dumps(payload).encode(), payload, alias, "application/json")


def router_for(
    forwarder: FakeForwarder, table: RouteTable, probe_replicas: int = 16
) -> tuple[ResponsesRouter, ResponseMap]:
    ids = ResponseMap(max_ids=100, retention_s=3600)
    return ResponsesRouter(forwarder, table, ids, probe_replicas), ids


GENERATE_M = {"m": (ModelTask.GENERATE, ["r1", "r2"])}


async def test_an_id_whose_replica_is_gone_is_404_response_not_found() -> None:
    forwarder = FakeForwarder(held={"r1": {"resp_old"}})
    router, ids = router_for(forwarder, table_with(GENERATE_M))
    ids.remember("resp_old", "m", "r-gone")  # its replica stopped: not in the route any more
    ids.remember("resp_orphan", "deleted-model", "r9")  # its whole model is no longer in the table
    for response_id in ("resp_old", "resp_orphan"):
        for action in ("get", "cancel"):
            with pytest.raises(APIError) as err:
                await router.follow(response_id, action)
            assert (err.value.status, err.value.code) == (404, "response_not_found"), (response_id, action)
            assert response_id in err.value.message
        with pytest.raises(APIError) as err:
            await router.create(responses_request("m", previous_response_id=response_id), None)
        assert (err.value.status, err.value.code) == (404, "response_not_found"), response_id
    # A replica that fails before answering took its responses with it: 404 too, not an error of ours.
    ids.remember("resp_x", "m", "r2")
    forwarder.failing.add("r2")
    with pytest.raises(APIError) as err:
        await router.follow("resp_x", "get")
    assert (err.value.status, err.value.code) == (404, "response_not_found")


async def test_continuing_another_models_response_is_404() -> None:
    forwarder = FakeForwarder()
    router, ids = router_for(forwarder, table_with({**GENERATE_M, "n": (ModelTask.GENERATE, ["r5"])}))
    ids.remember("resp_n", "n", "r5")
    with pytest.raises(APIError) as err:
        await router.create(responses_request("m", previous_response_id="resp_n"), None)
    assert (err.value.status, err.value.code) == (404, "response_not_found")
    assert forwarder.sent == []


async def test_an_unknown_id_is_found_by_probing_the_ready_replicas() -> None:
    table = table_with(
        {
            "m": (ModelTask.GENERATE, ["r1", "r2", "r3"]),
            "emb": (ModelTask.EMBED, ["e1"]),  # an embedding model holds no responses: never asked
        }
    )
    forwarder = FakeForwarder(held={"r2": {"resp_p"}, "e1": {"resp_p"}})
    router, ids = router_for(forwarder, table)
    response = await router.follow("resp_p", "get")
    assert response.status_code == 200 and json.loads(bytes(response.body))["id"] == "resp_p"
    probes = forwarder.asked("GET")[:-1]  # then the GET itself, to the holder
    assert sorted(probes) == ["r1", "r2", "r3"]
    assert forwarder.sent[-1][:4] == ("GET", "/v1/responses/resp_p", "m", "r2")
    assert lookup(ids, "resp_p") == ("m", "r2")  # remembered: asked directly from now on
    forwarder.sent.clear()
    await router.follow("resp_p", "get")
    assert forwarder.asked("GET") == ["r2"]
    # Nobody holds it: 404, after asking every ready replica once.
    forwarder.sent.clear()
    with pytest.raises(APIError) as err:
        await router.follow("resp_nowhere", "get")
    assert (err.value.status, err.value.code) == (404, "response_not_found")
    assert sorted(forwarder.asked("GET")) == ["r1", "r2", "r3"]
    assert lookup(ids, "resp_nowhere") is None


async def test_probing_for_a_previous_response_asks_the_requests_model_only() -> None:
    table = table_with({**GENERATE_M, "n": (ModelTask.GENERATE, ["r5"])})
    forwarder = FakeForwarder(held={"r2": {"resp_prev"}, "r5": {"resp_prev"}})
    forwarder.created["r2"] = JSONResponse(stored("resp_next"))
    router, ids = router_for(forwarder, table)
    request = responses_request("m", previous_response_id="resp_prev")
    response = await router.create(request, None)
    assert response.status_code == 200
    assert sorted(forwarder.asked("GET")) == ["r1", "r2"]
    assert forwarder.sent[-1] == ("POST", "/v1/responses", "m", "r2", request.body)  # the body as it came
    assert lookup(ids, "resp_prev") == ("m", "r2") and lookup(ids, "resp_next") == ("m", "r2")


async def test_the_probe_is_bounded_by_probe_replicas() -> None:
    table = table_with({"m": (ModelTask.GENERATE, ["r1", "r2", "r3", "r4"])})
    forwarder = FakeForwarder(held={"r3": {"resp_far"}})
    router, ids = router_for(forwarder, table, probe_replicas=2)
    with pytest.raises(APIError) as err:
        await router.follow("resp_far", "get")
    assert (err.value.status, err.value.code) == (404, "response_not_found")
    assert len(forwarder.asked("GET")) == 2 and "r3" not in forwarder.asked("GET")
    assert lookup(ids, "resp_far") is None


async def test_follow_sends_get_and_cancel_to_the_holder() -> None:
    forwarder = FakeForwarder(held={"r2": {"resp_c"}})
    router, ids = router_for(forwarder, table_with(GENERATE_M))
    ids.remember("resp_c", "m", "r2")
    response = await router.follow("resp_c", "cancel")
    assert forwarder.sent == [("POST", "/v1/responses/resp_c/cancel", "m", "r2", b"")]
    assert response.status_code == 200 and json.loads(bytes(response.body))["status"] == "cancelled"
    forwarder.sent.clear()
    response = await router.follow("resp_c", "get")
    assert forwarder.sent == [("GET", "/v1/responses/resp_c", "m", "r2", b"")]
    assert json.loads(bytes(response.body))["status"] == "completed"


async def test_an_id_goes_into_the_path_quoted() -> None:
    odd = "resp_?x=1&y=../../v1/models#"
    forwarder = FakeForwarder()
    router, ids = router_for(forwarder, table_with(GENERATE_M))
    ids.remember(odd, "m", "r1")
    await router.follow(odd, "cancel")
    assert forwarder.sent[0][:2] == ("POST", "/v1/responses/resp_%3Fx%3D1%26y%3D..%2F..%2Fv1%2Fmodels%23/cancel")


async def test_create_learns_the_id_of_a_response() -> None:
    table = table_with(GENERATE_M)
    forwarder = FakeForwarder()
    router, ids = router_for(forwarder, table)
    answer = JSONResponse({**stored("resp_new1"), "output": [{"id": "msg_1", "type": "message"}]})
    forwarder.next = (answer, table.route("m").endpoints[1])
    assert await router.create(responses_request("m"), "alice") is answer
    assert lookup(ids, "resp_new1") == ("m", "r2")
    # An error is not a response: nothing learned from it.
    forwarder.next = (JSONResponse({"id": "resp_err", "error": "x"}, status_code=400), table.route("m").endpoints[0])
    assert (await router.create(responses_request("m"), None)).status_code == 400
    assert lookup(ids, "resp_err") is None and len(ids) == 1


async def test_create_learns_the_id_of_a_streamed_response() -> None:
    table = table_with(GENERATE_M)
    forwarder = FakeForwarder()
    router, ids = router_for(forwarder, table)
    created = {"type": "response.created", "response": stored("resp_streamed", "in_progress")}
    text = json.dumps(created)
    cut = text.index("resp_streamed") + 6  # the id split over two chunks
    events = [
        b"event: response.created\ndata: " + text[:cut].encode(),
        text[cut:].encode() + b"\n\n",
        b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": "hi"}\n\n',
        b'event: response.completed\ndata: {"type": "response.completed"}\n\n',
    ]
    assert all(b"resp_streamed" not in event for event in events) and b"resp_streamed" in b"".join(events)

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    answer = StreamingResponse(stream(), media_type="text/event-stream")
    forwarder.next = (answer, table.route("m").endpoints[0])
    response = await router.create(responses_request("m", stream=True), None)
    assert isinstance(response, StreamingResponse)
    relayed = [chunk async for chunk in response.body_iterator]
    assert relayed == events  # passed on unchanged
    assert lookup(ids, "resp_streamed") == ("m", "r1")


# =========================================================================== whose response it is


def key(key_id: str, *models: str) -> ActiveKey:
    """A key made at run time that may use `models` (aliases)."""
    return ActiveKey(key_id, key_id, "t", Priority.NORMAL, KeyLimits(), None, False, frozenset(models), ())


async def test_a_key_reaches_only_its_own_responses() -> None:
    forwarder = FakeForwarder(held={"r1": {"resp_a", "resp_a2", "resp_env"}})
    router, _ = router_for(forwarder, table_with(GENERATE_M))
    mine, other = key("key-a", "m"), key("key-b", "m")
    for response_id, maker in (("resp_a", mine), ("resp_env", None)):  # None: an environment key
        forwarder.created["r1"] = JSONResponse(stored(response_id))
        forwarder.next = (forwarder.created["r1"], endpoint("r1"))
        await router.create(responses_request("m"), None, maker)
    assert (await router.follow("resp_a", "get", viewer=mine)).status_code == 200
    assert (await router.follow("resp_a", "get")).status_code == 200  # the operator's keys reach every response
    assert (await router.follow("resp_env", "get")).status_code == 200
    forwarder.sent.clear()
    # Another key's, or one made with an environment key: as unknown as an id that never was (and not probed for).
    for response_id, viewer in (("resp_a", other), ("resp_env", mine), ("resp_env", other)):
        for action in ("get", "cancel"):
            with pytest.raises(APIError) as err:
                await router.follow(response_id, action, viewer=viewer)
            assert (err.value.status, err.value.code) == (404, "response_not_found"), (response_id, viewer.id)
        with pytest.raises(APIError) as err:
            await router.create(responses_request("m", previous_response_id=response_id), None, viewer)
        assert (err.value.status, err.value.code) == (404, "response_not_found")
    assert forwarder.sent == []
    # Continued by its maker: the continuation is the maker's too.
    forwarder.created["r1"] = JSONResponse(stored("resp_a2"))
    await router.create(responses_request("m", previous_response_id="resp_a"), None, mine)
    assert (await router.follow("resp_a2", "get", viewer=mine)).status_code == 200
    with pytest.raises(APIError):
        await router.follow("resp_a2", "get", viewer=other)


async def test_a_response_found_on_a_replica_is_reached_only_by_keys_of_its_model() -> None:
    """An id this router did not make (another router process, a restart) has no known maker: a key finds it only
    among the replicas of models it may use."""
    models = {**GENERATE_M, "n": (ModelTask.GENERATE, ["r5"])}
    forwarder = FakeForwarder(held={"r5": {"resp_n"}})
    router, _ = router_for(forwarder, table_with(models))
    with pytest.raises(APIError) as err:
        await router.follow("resp_n", "get", viewer=key("key-m", "m"))
    assert (err.value.status, err.value.code) == (404, "response_not_found")
    assert sorted(forwarder.asked()) == ["r1", "r2"]  # the replicas of its own model only
    assert (await router.follow("resp_n", "get", viewer=key("key-n", "n"))).status_code == 200
    # Now known here, still without a maker: the model decides, for every key.
    with pytest.raises(APIError):
        await router.follow("resp_n", "get", viewer=key("key-m", "m"))
    assert (await router.follow("resp_n", "get", viewer=key("key-n2", "n"))).status_code == 200
