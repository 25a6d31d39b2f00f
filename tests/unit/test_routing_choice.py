"""A model's `routing` (session, least_loaded, prefix): registration and PATCH, persistence, the route that carries it
to the routers, the table's use of it, and the router's prefix metrics."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from serverless_vllm.config import ManagerSettings
from serverless_vllm.errors import APIError
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.metrics.router import RouterMetrics
from serverless_vllm.router.policy import RequestKey
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelPatch, ModelRoute, ModelSpec, ModelState, Routing, RoutingTable

NO_CACHE = ["--no-enable-prefix-caching"]


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[ManagerCore]:
    c = ManagerCore(ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"]))
    await c.start()
    yield c
    await c.close()


def spec(alias: str = "a", **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/a", "preload": False, **kw})


# ---------------------------------------------------------------- validation


def test_routing_defaults_to_session_and_is_one_of_three() -> None:
    assert spec().routing is Routing.SESSION  # every model's routing before the field existed
    assert {spec(routing=r).routing for r in ("session", "least_loaded", "prefix")} == set(Routing)
    with pytest.raises(ValidationError, match="routing"):
        spec(routing="round_robin")
    with pytest.raises(ValidationError):
        ModelPatch.model_validate({"routing": "random"})
    assert ModelPatch.model_validate({"routing": "prefix"}).routing is Routing.PREFIX


def test_prefix_routing_needs_the_engines_prefix_cache() -> None:
    for flag in ("--no-enable-prefix-caching", "--no_enable_prefix_caching"):
        with pytest.raises(ValidationError, match="prefix cache"):
            spec(routing="prefix", extra_args=[flag])
    assert spec(routing="least_loaded", extra_args=NO_CACHE).extra_args == NO_CACHE
    assert spec(routing="prefix", extra_args=["--enable-prefix-caching"]).routing is Routing.PREFIX


# ---------------------------------------------------------------- the manager: register, patch, persist, publish


async def test_registration_carries_routing_to_the_route(core: ManagerCore) -> None:
    await core.register_model(spec("p", routing="prefix"))
    await core.register_model(spec("s"))
    info = core.model_info("p")
    assert info.policy.routing is Routing.PREFIX and core.model_info("s").policy.routing is Routing.SESSION
    table = core.routing_table()
    assert table.models["p"].routing is Routing.PREFIX and table.models["s"].routing is Routing.SESSION
    # Another routing is another registration: the same alias with other settings is refused.
    with pytest.raises(APIError) as err:
        await core.register_model(spec("p", routing="least_loaded"))
    assert err.value.status == 409


async def test_patch_changes_routing_and_publishes_it_at_once(core: ManagerCore) -> None:
    await core.register_model(spec("a", extra_args=NO_CACHE))
    version = core.routing_table().version
    info = await core.patch_model("a", ModelPatch(routing=Routing.LEAST_LOADED))
    assert info.policy.routing is Routing.LEAST_LOADED
    table = core.routing_table()
    assert table.version > version and table.models["a"].routing is Routing.LEAST_LOADED  # no pass needed
    # A patch that would route by prefix to engines without a prefix cache: 400, nothing changed.
    with pytest.raises(APIError) as err:
        await core.patch_model("a", ModelPatch(routing=Routing.PREFIX))
    assert err.value.status == 400 and "prefix cache" in err.value.message
    assert core.model_info("a").policy.routing is Routing.LEAST_LOADED
    # Other fields leave it alone.
    await core.patch_model("a", ModelPatch(max_replicas=3))
    assert core.model_info("a").policy.routing is Routing.LEAST_LOADED


async def test_routing_survives_a_restart_and_old_registrations_load(tmp_path: Path) -> None:
    settings = ManagerSettings(db_path=str(tmp_path / "m.db"), model_dirs=["/"])
    first = ManagerCore(settings)
    await first.register_model(spec("p", routing="prefix"))
    await first.patch_model("p", ModelPatch(routing=Routing.LEAST_LOADED))
    await first.close()
    # A registration written before `routing` existed: its spec has no such key.
    old = spec("old").model_dump(mode="json")
    del old["routing"]
    with sqlite3.connect(settings.db_path) as db:
        db.execute("INSERT INTO models (alias, spec, created_at) VALUES (?, ?, ?)", ("old", json.dumps(old), 1.0))
    second = ManagerCore(settings)
    assert second.model_info("p").policy.routing is Routing.LEAST_LOADED
    assert second.model_info("old").policy.routing is Routing.SESSION
    await second.close()


def test_route_json_names_routing_only_when_it_is_not_the_default() -> None:
    default = ModelRoute(state=ModelState.COLD)
    assert "routing" not in default.model_dump_json()  # 10,000 routes stay as small as before
    prefix = ModelRoute(state=ModelState.COLD, routing=Routing.PREFIX)
    assert json.loads(prefix.model_dump_json())["routing"] == "prefix"
    table = RoutingTable(version=1, epoch="e", models={"a": default, "b": prefix})
    again = RoutingTable.model_validate_json(table.model_dump_json())
    assert again.models["a"].routing is Routing.SESSION and again.models["b"].routing is Routing.PREFIX


# ---------------------------------------------------------------- the router's table


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(replica_id=f"r{i}", worker_id=f"w{i}", url=f"http://w{i}") for i in range(n)]


def table_of(**routing: Routing) -> RouteTable:
    table = RouteTable(rng=random.Random(0))
    models = {
        alias: ModelRoute(
            state=ModelState.READY,
            routing=r,
            endpoints=[e.model_copy(update={"replica_id": f"{alias}-{e.replica_id}"}) for e in endpoints(2)],
        )
        for alias, r in routing.items()
    }
    table.update(RoutingTable(version=1, epoch="e", models=models))
    return table


LONG = "A shared system prompt that is long enough to span several blocks. " * 20


def chat_key(session: str | None, question: str) -> RequestKey:
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": question}]
    return RequestKey(session, {"messages": messages}, "chat")


def test_the_table_routes_each_model_by_its_routing() -> None:
    table = table_of(s=Routing.SESSION, ll=Routing.LEAST_LOADED, p=Routing.PREFIX)
    # session: a keyed request keeps its replica whatever the load.
    keyed = table.pick("s", key=chat_key("alice", "q"))
    assert keyed is not None
    table.started("s", keyed)
    assert {table.pick("s", key=chat_key("alice", f"q{i}")).replica_id for i in range(10)} == {keyed.replica_id}
    # least_loaded: the key is ignored, the less loaded replica wins.
    first = table.pick("ll", key=chat_key("alice", "q"))
    assert first is not None
    table.started("ll", first)
    assert table.pick("ll", key=chat_key("alice", "q")).replica_id != first.replica_id
    # prefix: the prompt decides, with or without a key.
    home = table.pick("p", key=chat_key(None, "q0"))
    assert home is not None
    assert {table.pick("p", key=chat_key(f"user-{i}", f"q{i}")).replica_id for i in range(10)} == {home.replica_id}


def test_only_models_routed_by_prefix_hash_the_prompt() -> None:
    table = table_of(s=Routing.SESSION, ll=Routing.LEAST_LOADED, p=Routing.PREFIX)
    for alias in ("s", "ll"):
        key = chat_key(None, "q")
        table.pick(alias, key=key)
        assert key.prefix is None  # the hot path of these models never computed a hash
    key = chat_key(None, "q")
    table.pick("p", key=key)
    assert key.prefix


def test_prefix_statistics_follow_the_models_routed_by_prefix() -> None:
    table = table_of(s=Routing.SESSION, p=Routing.PREFIX, q=Routing.PREFIX)
    metrics = RouterMetrics(lambda: table)
    text = metrics.render().decode()
    assert 'svllm_router_prefix_blocks_total{model="p"} 0.0' in text  # present before a first request
    assert 'svllm_router_prefix_blocks_total{model="s"}' not in text
    for i in range(3):
        table.pick("p", key=chat_key(None, f"question {i}"))
    stats = table.prefix_stats()["p"]
    blocks = len(chat_key(None, "question 0").payload["messages"][0]["content"]) // 128  # type: ignore[index]
    assert stats.blocks >= 3 * blocks and stats.hit_blocks >= 2 * blocks
    text = metrics.render().decode()
    assert f'svllm_router_prefix_blocks_total{{model="p"}} {float(stats.blocks)}' in text
    assert f'svllm_router_prefix_hit_blocks_total{{model="p"}} {float(stats.hit_blocks)}' in text
    # PATCHed to another routing (or deleted): its statistics go.
    routes = dict(table.aliases())
    routes["p"] = routes["p"].model_copy(update={"routing": Routing.SESSION})
    table.update(RoutingTable(version=2, epoch="e", models=routes))
    assert set(table.prefix_stats()) == {"q"} and "p" not in table.prefix.stats
    assert 'model="p"' not in metrics.render().decode().split("svllm_router_prefix_blocks")[1]
