"""A model registered with `scheduling_policy: priority`: its engines get vLLM's --scheduling-policy priority, its
route says so (an adapter's follows its base), and the router gives a key's request its class as `priority`
(overriding the client's). The engine serving in that order: tests/test_tenants.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from serverless_vllm.config import WorkerSettings
from serverless_vllm.dataplane.body import InferenceRequest
from serverless_vllm.dataplane.endpoints import ENDPOINTS
from serverless_vllm.errors import APIError
from serverless_vllm.router.limits import Limiter
from serverless_vllm.router.table import RouteTable
from serverless_vllm.router.tenant_gate import TenantGate, for_engine
from serverless_vllm.router.usage import UsageBook
from serverless_vllm.schemas import (
    Assignment,
    EngineArgs,
    KeyLimits,
    ModelRoute,
    ModelSpec,
    ModelState,
    Priority,
    RoutingTable,
    SchedulingPolicy,
    WorkerRegistration,
)
from serverless_vllm.security.keys import ActiveKey
from serverless_vllm.security.models import check_engine_args
from serverless_vllm.worker.engine import EngineProcess
from starlette.responses import Response

from .fleet import NOWHERE, Clock, core_settings, running_core

BY_PATH = {e.path: e for e in ENDPOINTS}


def request(path: str, payload: dict[str, object], alias: str = "m") -> InferenceRequest:
    body = json.dumps(payload).encode()
    return InferenceRequest(BY_PATH[path], body, {"model": alias, **payload}, alias, "application/json")


def test_the_engine_is_started_with_priority_scheduling(tmp_path: Path) -> None:
    settings = WorkerSettings.model_validate({"worker_id": "w", "log_dir": str(tmp_path)})

    def command(policy: SchedulingPolicy) -> list[str]:
        a = Assignment(replica_id="r", alias="m", model_name="/m", engine=EngineArgs(scheduling_policy=policy))
        return EngineProcess(a, settings, has_gpu=False).command(4000)

    cmd = command(SchedulingPolicy.PRIORITY)
    assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"
    assert "--scheduling-policy" not in command(SchedulingPolicy.FCFS)  # vLLM's default: nothing to say


@pytest.mark.parametrize("args", [["--scheduling-policy", "priority"], ["--scheduling_policy=priority"]])
def test_extra_args_may_not_set_the_policy(args: list[str]) -> None:
    with pytest.raises(APIError) as err:  # the router would not know it, and pass no priorities
        check_engine_args(args)
    assert err.value.status == 400 and err.value.code == "engine_arg_not_allowed"


async def test_the_route_of_a_priority_model_and_of_its_adapter_says_so(tmp_path: Path) -> None:
    async with running_core(core_settings(tmp_path), Clock()) as core:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=2))
        await core.register_model(ModelSpec(alias="ranked", model_name="org/a", scheduling_policy="priority"))
        await core.register_model(ModelSpec(alias="plain", model_name="org/b"))
        await core.register_model(ModelSpec.model_validate({"alias": "ad", "base": "ranked", "adapter": "org/ad"}))
        routes = core.routing_table().models
        assert (routes["ranked"].priority_scheduling, routes["ad"].priority_scheduling) == (True, True)
        assert routes["plain"].priority_scheduling is False
        # Left out of the published JSON where false (most routes): the table of 10,000 models stays as small.
        published = json.loads(core.routing_table().model_dump_json())["models"]
        assert published["ranked"]["priority_scheduling"] is True and "priority_scheduling" not in published["plain"]


def test_the_request_for_the_engine() -> None:
    plain = request("/v1/completions", {"prompt": "hi", "max_tokens": 4})
    assert for_engine(plain, None) == (plain, False)  # nothing to change: the same object, the same bytes
    ranked, strip = for_engine(plain, 1)
    assert not strip and json.loads(ranked.body) == {"prompt": "hi", "max_tokens": 4, "model": "m", "priority": 1}
    # The key's class wins over what its client asked.
    asked_high = request("/v1/chat/completions", {"messages": [], "priority": -100, "stream": True})
    ranked, strip = for_engine(asked_high, 0)
    assert strip and ranked.payload["priority"] == 0 and ranked.payload["stream_options"] == {"include_usage": True}
    same = request("/v1/completions", {"prompt": "hi", "priority": -1})
    assert for_engine(same, -1)[0] is same


def key(priority: Priority) -> ActiveKey:
    return ActiveKey("id", "k", "t", priority, KeyLimits(), None, False, frozenset(), ("*",))


def gate_sending(table: RouteTable) -> tuple[TenantGate, list[InferenceRequest]]:
    gate = TenantGate(Limiter(), UsageBook(lambda alias: alias))
    gate.table = table
    sent: list[InferenceRequest] = []

    async def call(r: InferenceRequest) -> Response:
        sent.append(r)
        return Response(b"{}", media_type="application/json")

    gate.call = call  # type: ignore[attr-defined]
    return gate, sent


def test_the_gate_gives_each_class_its_priority_where_engines_schedule_by_it() -> None:
    table = RouteTable()
    ready = ModelState.READY
    table.update(
        RoutingTable(
            version=1,
            epoch="e",
            models={"ranked": ModelRoute(state=ready, priority_scheduling=True), "plain": ModelRoute(state=ready)},
        )
    )
    gate, sent = gate_sending(table)

    def priority_sent(alias: str, path: str, cls: Priority, payload: dict[str, object]) -> object:
        asyncio.run(gate.serve(key(cls), request(path, payload, alias), gate.call))  # type: ignore[attr-defined]
        return sent[-1].payload.get("priority", "unset")

    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert [priority_sent("ranked", "/v1/chat/completions", c, chat) for c in Priority] == [-1, 0, 1]
    assert priority_sent("ranked", "/v1/embeddings", Priority.LOW, {"input": "x"}) == 1
    assert priority_sent("plain", "/v1/chat/completions", Priority.HIGH, chat) == "unset"  # FCFS engines refuse it
    assert priority_sent("ranked", "/tokenize", Priority.HIGH, {"prompt": "x"}) == "unset"  # no such field there


def test_svllm_register_takes_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_load_format import sent_by

    body = sent_by(monkeypatch, "--model", "org/a", "--scheduling-policy", "priority")
    assert body == {"alias": "a", "model_name": "org/a", "scheduling_policy": "priority"}
    assert ModelSpec.model_validate(body).scheduling_policy is SchedulingPolicy.PRIORITY
    assert "scheduling_policy" not in sent_by(monkeypatch, "--model", "org/a")  # the default is left to the manager
    with pytest.raises(SystemExit):  # an adapter is scheduled as its base
        sent_by(monkeypatch, "--alias", "ad", "--base", "a", "--adapter", "org/ad", "--scheduling-policy", "priority")
