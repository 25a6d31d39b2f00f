"""LoRA adapters in the manager (manager/adapters.py), without transport: which base replica is asked to load an
adapter, LRU unloads at max_loras, routes from what engines report, refused loads, deletion rules. The same rules
on the real engine: tests/test_lora.py."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from serverless_vllm.cli_lora import add_lora_flags, registration
from serverless_vllm.errors import APIError
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import (
    Assignment,
    DemandReport,
    EngineStatus,
    Heartbeat,
    ModelLoad,
    ModelPatch,
    ModelSpec,
    ReplicaState,
    WorkerRegistration,
)

from .fleet import NOWHERE, Clock, core_settings, running_core


def lazy(name: str) -> dict[str, Any]:
    """An adapter of `base` loaded by its first request (no preload: these tests place adapters by demand)."""
    return {"alias": name, "base": "base", "adapter": f"org/{name}", "preload": False}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def core(tmp_path: Path, clock: Clock) -> AsyncIterator[ManagerCore]:
    async with running_core(core_settings(tmp_path), clock) as c:
        await c.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=2))
        await c.register_model(ModelSpec(alias="base", model_name="org/base", min_replicas=2, max_replicas=2))
        for name in ("a1", "a2"):
            await c.register_model(ModelSpec.model_validate(lazy(name)))
        yield c


async def beat(
    core: ManagerCore, loaded: dict[str, list[str]], errors: dict[str, dict[str, str]] | None = None
) -> list[Assignment]:
    """A heartbeat of w1 with every assigned engine ready and holding `loaded[replica id]`; its assignments."""
    assigned = (await core.heartbeat(Heartbeat(worker_id="w1"))).assignments
    engines = [
        EngineStatus(
            replica_id=a.replica_id,
            alias=a.alias,
            state=ReplicaState.READY,
            lora=a.engine.enable_lora,
            adapters=loaded.get(a.replica_id, []),
            adapter_errors=(errors or {}).get(a.replica_id, {}),
        )
        for a in assigned
    ]
    return (await core.heartbeat(Heartbeat(worker_id="w1", engines=engines))).assignments


async def ask(core: ManagerCore, alias: str, busy: dict[str, int] | None = None) -> None:
    """A router reports a request waiting for `alias`, and the replicas' loads; then a pass."""
    load = ModelLoad(queued=1, replicas=busy or {})
    await core.report_demand(DemandReport(router_id="r1", models={alias: load}, wake=[alias]))
    await core.reconcile()


async def ready_base(core: ManagerCore) -> list[Assignment]:
    await core.reconcile()
    assigned = await beat(core, {})
    assert len(assigned) == 2 and all(a.engine.enable_lora for a in assigned)  # the base has adapters: LoRA on
    return assigned


async def test_an_adapter_goes_to_the_least_busy_replica_and_is_routed_once_its_engine_reports_it(
    core: ManagerCore,
) -> None:
    first, second = await ready_base(core)
    assert core.routing_table().models["a1"].state == "cold"
    await ask(core, "a1", busy={first.replica_id: 3})
    assigned = {a.replica_id: a.adapters for a in await beat(core, {})}
    assert assigned == {first.replica_id: {}, second.replica_id: {"a1": "org/a1"}}
    route = core.routing_table().models["a1"]
    assert route.state == "loading" and route.parent == "base" and not route.endpoints  # asked, not yet held

    await beat(core, {second.replica_id: ["a1"]})
    route = core.routing_table().models["a1"]
    assert route.state == "ready" and [e.replica_id for e in route.endpoints] == [second.replica_id]
    info = core.model_info("a1")
    assert info.base == "base" and [r.replica_id for r in info.replicas] == [second.replica_id]
    # What its engines run with: the base's arguments, LoRA on (the base was registered without it), not the
    # defaults an adapter's registration leaves.
    base = core.model_info("base")
    assert base.engine.enable_lora and info.engine == base.engine
    assert core.registry.require("base").engine().enable_lora is False  # its registration is kept as it was


@contextlib.asynccontextmanager
async def one_slot(tmp_path: Path, clock: Clock) -> AsyncIterator[tuple[ManagerCore, Assignment]]:
    """A base with max_loras 1 on its one ready replica, and its adapters a1 (asked for: loading there) and a2."""
    async with running_core(core_settings(tmp_path), clock) as core:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
        await core.register_model(ModelSpec(alias="base", model_name="org/base", min_replicas=1, max_loras=1))
        for name in ("a1", "a2"):
            await core.register_model(ModelSpec.model_validate(lazy(name)))
        await core.reconcile()
        (only,) = await beat(core, {})
        await ask(core, "a1")
        yield core, only


async def test_at_max_loras_the_least_recently_used_adapter_is_unloaded(tmp_path: Path) -> None:
    async with one_slot(tmp_path, Clock()) as (core, only):
        assert [a.adapters for a in await beat(core, {only.replica_id: ["a1"]})] == [{"a1": "org/a1"}]
        await ask(core, "a2")
        assert [a.adapters for a in await beat(core, {only.replica_id: []})] == [{"a2": "org/a2"}]
        assert core.adapters.stats.unloads == {"a1": 1}


async def test_two_busy_adapters_on_one_slot_take_turns_not_a_load_every_pass(tmp_path: Path) -> None:
    clock = Clock()
    async with one_slot(tmp_path, clock) as (core, only):
        await beat(core, {only.replica_id: ["a1"]})
        both = {"a1": ModelLoad(in_flight=1), "a2": ModelLoad(queued=1)}
        await core.report_demand(DemandReport(router_id="r1", models=both, wake=["a2"]))
        await core.reconcile()
        assert [a.adapters for a in await beat(core, {only.replica_id: ["a1"]})] == [{"a1": "org/a1"}]  # a1 kept
        clock.now += 6  # a1 held MIN_HOLD_S: now a2's turn
        await core.report_demand(DemandReport(router_id="r1", models=both, wake=["a2"]))
        await core.reconcile()
        assert [a.adapters for a in await beat(core, {only.replica_id: ["a1"]})] == [{"a2": "org/a2"}]


async def test_a_load_the_engine_refuses_fails_the_adapter_with_its_reason(core: ManagerCore) -> None:
    await ready_base(core)
    await ask(core, "a1")
    holder = next(a.replica_id for a in await beat(core, {}) if a.adapters)
    assigned = await beat(core, {}, {holder: {"a1": "LoRA rank 64 is greater than max_lora_rank 16."}})
    assert all(not a.adapters for a in assigned)  # not asked again while failed
    route = core.routing_table().models["a1"]
    assert route.state == "failed" and route.error is not None and "greater than max_lora_rank 16" in route.error
    assert core.model_info("a1").last_error == route.error


async def test_a_busy_adapter_spreads_to_one_more_replica_and_an_idle_one_is_unloaded(
    core: ManagerCore, clock: Clock
) -> None:
    await ready_base(core)
    await ask(core, "a1")
    holder = next(a.replica_id for a in await beat(core, {}) if a.adapters)
    await beat(core, {holder: ["a1"]})
    busy = ModelLoad(in_flight=9)  # above target_concurrency 8 for its one holder
    await core.report_demand(DemandReport(router_id="r1", models={"a1": busy}))
    await core.reconcile()
    assigned = await beat(core, {holder: ["a1"]})
    assert [a.adapters for a in assigned] == [{"a1": "org/a1"}, {"a1": "org/a1"}]

    clock.now += 400  # past its idle_timeout_s (300) with no request, and the routers' reports expired
    await core.reconcile()
    assert [a.adapters for a in await beat(core, {})] == [{}, {}]


async def test_a_preloaded_adapter_takes_a_free_slot_once_its_base_is_ready_and_never_unloads_another(
    tmp_path: Path,
) -> None:
    """`preload` (the default): no request needed. Held back while the base is cold (the preload starts nothing), put
    in a free slot once it is ready; where every slot is taken, left to its first request (nothing unloaded)."""
    async with running_core(core_settings(tmp_path), Clock()) as core:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
        await core.register_model(ModelSpec(alias="base", model_name="org/base", max_loras=1, preload=False))
        await core.register_model(ModelSpec.model_validate({"alias": "a1", "base": "base", "adapter": "org/a1"}))
        await core.reconcile()
        assert await beat(core, {}) == []  # the base stays cold
        assert core.routing_table().models["a1"].state == "cold"

        await core.register_model(ModelSpec.model_validate({"alias": "a2", "base": "base", "adapter": "org/a2"}))
        await core.patch_model("base", ModelPatch(min_replicas=1))
        await core.reconcile()
        (only,) = await beat(core, {})  # the base's replica made and reported ready
        await core.reconcile()
        assigned = await beat(core, {only.replica_id: []})
        assert [a.adapters for a in assigned] == [{"a1": "org/a1"}]  # one slot: a1 (sorted first), not a2
        await beat(core, {only.replica_id: ["a1"]})
        assert core.routing_table().models["a1"].state == "ready"
        assert core.routing_table().models["a2"].state == "cold"

        # a3, registered while the slot is taken, does not unload a1; and tried once: neither a2 nor a3 is put in
        # the slot once a1's deletion frees it.
        await core.register_model(ModelSpec.model_validate({"alias": "a3", "base": "base", "adapter": "org/a3"}))
        await core.reconcile()
        assert [a.adapters for a in await beat(core, {only.replica_id: ["a1"]})] == [{"a1": "org/a1"}]
        await core.delete_model("a1")
        await core.reconcile()
        assert [a.adapters for a in await beat(core, {only.replica_id: []})] == [{}]
        await core.reconcile()
        assert [a.adapters for a in await beat(core, {only.replica_id: []})] == [{}]
        await ask(core, "a2")  # its first request loads it
        assert [a.adapters for a in await beat(core, {only.replica_id: []})] == [{"a2": "org/a2"}]


async def test_a_preloaded_adapter_goes_to_the_emptiest_ready_replica_at_registration(core: ManagerCore) -> None:
    """The base is up: the next pass puts it in a free slot (the replica holding fewer adapters), no request asked."""
    first, second = await ready_base(core)
    await ask(core, "a1")
    holder = next(a.replica_id for a in await beat(core, {}) if a.adapters)
    await core.register_model(ModelSpec.model_validate({"alias": "a3", "base": "base", "adapter": "org/a3"}))
    await core.reconcile()
    assigned = {a.replica_id: a.adapters for a in await beat(core, {holder: ["a1"]})}
    other = second.replica_id if holder == first.replica_id else first.replica_id
    assert assigned == {holder: {"a1": "org/a1"}, other: {"a3": "org/a3"}}
    # Registered again while it is held: nothing more to do.
    assert core.adapters.preload("a3") is False


async def test_an_adapter_registered_again_once_unloaded_is_preloaded_again(core: ManagerCore, clock: Clock) -> None:
    """As a model registered again with `preload` starts again (`svllm up` run again finds it cold)."""
    await ready_base(core)
    spec = ModelSpec.model_validate({"alias": "a3", "base": "base", "adapter": "org/a3"})
    await core.register_model(spec)
    await core.reconcile()
    holder = next(a.replica_id for a in await beat(core, {}) if a.adapters)
    await beat(core, {holder: ["a3"]})
    clock.now += 400  # past its idle_timeout_s (300): unloaded
    await core.reconcile()
    assert [a.adapters for a in await beat(core, {})] == [{}, {}]
    await core.register_model(spec)  # the same registration: nothing new is stored, the adapter is loaded again
    await core.reconcile()
    assert [a.adapters for a in await beat(core, {}) if a.adapters] == [{"a3": "org/a3"}]


async def test_after_a_manager_restart_the_adapters_engines_hold_are_kept(tmp_path: Path) -> None:
    settings = core_settings(tmp_path)
    async with running_core(settings, Clock()) as core:
        await core.register_model(ModelSpec(alias="base", model_name="org/base", min_replicas=1, preload=True))
        await core.register_model(ModelSpec.model_validate({"alias": "a1", "base": "base", "adapter": "org/a1"}))
    async with running_core(settings, Clock()) as core:
        running = EngineStatus(
            replica_id="base-old", alias="base", model_name="org/base", state=ReplicaState.READY, lora=True
        )
        running.adapters = ["a1"]
        registration = WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1, engines=[running])
        reply = await core.register_worker(registration)
        assert [(a.replica_id, a.adapters) for a in reply.assignments] == [("base-old", {"a1": "org/a1"})]
        route = core.routing_table().models["a1"]
        assert route.state == "ready" and [e.replica_id for e in route.endpoints] == ["base-old"]


async def test_registration_and_deletion_rules(core: ManagerCore) -> None:
    with pytest.raises(APIError) as err:
        await core.register_model(ModelSpec.model_validate({"alias": "x", "base": "nope", "adapter": "org/x"}))
    assert err.value.status == 400 and err.value.code == "base_not_found"
    with pytest.raises(APIError) as err:
        await core.delete_model("base")
    assert err.value.status == 409 and err.value.code == "model_has_adapters"
    await core.delete_model("a1")
    await core.delete_model("a2")
    await core.delete_model("base")
    assert "base" not in core.routing_table().models


def test_svllm_register_flags_make_an_adapters_body_and_a_bases_lora_arguments() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--alias")
    add_lora_flags(parser)
    args = parser.parse_args(["--alias", "sql", "--base", "qwen", "--adapter", "org/sql-lora"])
    assert registration(args, lambda: {}) == {"alias": "sql", "base": "qwen", "adapter": "org/sql-lora"}
    args = parser.parse_args(["--model", "org/qwen", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "64"])
    body = registration(args, lambda: {"alias": "qwen", "model_name": "org/qwen"})
    assert body == {"alias": "qwen", "model_name": "org/qwen", "enable_lora": True, "max_loras": 2, "max_lora_rank": 64}
    with pytest.raises(SystemExit, match="needs --adapter, --base and --alias"):
        registration(parser.parse_args(["--adapter", "org/x"]), lambda: {})
