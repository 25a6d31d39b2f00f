"""The manager's /metrics stays proportional to what is running, not to the registry (10,000 models)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from serverless_vllm.config import ManagerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import ModelSpec, UsageReport, UsageRow, WorkerRegistration

from .fleet import NOWHERE, Clock


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


@contextlib.asynccontextmanager
async def one_worker_core(tmp_path: Path) -> AsyncIterator[ManagerCore]:
    """A started ManagerCore with one CPU worker registered (at an address nothing answers)."""
    core = ManagerCore(
        ManagerSettings(db_path=str(tmp_path / "m.db"), heartbeat_timeout_s=10, model_dirs=["/"]), clock=Clock()
    )
    await core.start()
    try:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
        yield core
    finally:
        await core.close()


async def test_per_model_series_stay_few_for_idle_models(tmp_path: Path) -> None:
    async with one_worker_core(tmp_path) as core:
        await core.register_model(ModelSpec(alias="hot", model_name="/m/hot", min_replicas=1))
        for i in range(3):
            await core.register_model(ModelSpec(alias=f"idle-{i}", model_name=f"/m/idle{i}", preload=False))
        await core.reconcile()
        text = (await core.metrics_text()).decode()

        # One state series per model: the current one.
        states = series(text, "svllm_model_state")
        assert len(states) == 4 and all(line.endswith(" 1.0") for line in states)
        assert 'svllm_model_state{model="hot",state="loading"} 1.0' in states
        # A model with no replica: replicas{state="ready"} 0 only; one with a replica: every state.
        idle = [line for line in series(text, "svllm_model_replicas") if 'model="idle-0"' in line]
        assert idle == ['svllm_model_replicas{model="idle-0",state="ready"} 0.0']
        assert 'svllm_model_replicas{model="hot",state="pending"} 1.0' in text
        assert 'svllm_model_replicas{model="hot",state="failed"} 0.0' in text
        # The cold-start counter exists for every model (so increase() sees the first one); the duration
        # histogram only for models that had a cold start, at 0 before the engine reports ready.
        assert len(series(text, "svllm_cold_starts_total")) == 4
        assert 'svllm_cold_starts_total{model="hot"} 1.0' in text
        assert 'svllm_cold_start_duration_seconds_count{model="hot"} 0.0' in text
        assert 'svllm_cold_start_duration_seconds_count{model="idle-0"}' not in text


async def test_deleted_models_leave_the_exposition(tmp_path: Path) -> None:
    async with one_worker_core(tmp_path) as core:
        await core.register_model(ModelSpec(alias="gone", model_name="/m/gone", min_replicas=1))
        await core.reconcile()
        assert 'svllm_cold_starts_total{model="gone"} 1.0' in (await core.metrics_text()).decode()
        await core.delete_model("gone")
        text = (await core.metrics_text()).decode()
        assert 'model="gone"' not in text
        # Registered again: its counter starts from 0, not from the deleted model's count.
        await core.register_model(ModelSpec(alias="gone", model_name="/m/gone", preload=False))
        assert 'svllm_cold_starts_total{model="gone"} 0.0' in (await core.metrics_text()).decode()
        # Registered, cold-started and deleted between two scrapes: nothing of it is left either.
        await core.register_model(ModelSpec(alias="brief", model_name="/m/brief", min_replicas=1))
        await core.reconcile()
        await core.delete_model("brief")
        assert 'model="brief"' not in (await core.metrics_text()).decode()


async def test_a_scrape_leaves_the_event_loop_free_and_parses(tmp_path: Path) -> None:
    """A scrape of a large registry is formatted off the event loop (the one that takes heartbeats), and what it
    writes is the text format prometheus_client's own parser reads back, series for series."""
    from prometheus_client.parser import text_string_to_metric_families

    async with one_worker_core(tmp_path) as core:
        for i in range(2000):
            await core.register_model(ModelSpec(alias=f"m-{i}", model_name=f"/m/{i}", preload=False))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        text = (await core.metrics_text()).decode()
        during = ticks - before
        task.cancel()
        assert during > 0  # the loop ran other work while the scrape was formatted

        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert len(families["svllm_model_state"].samples) == 2000
        assert len(families["svllm_cold_starts"].samples) == 2000  # the parser drops a counter's _total
        assert {s.labels["state"]: s.value for s in families["svllm_worker_state"].samples} == {
            "healthy": 1.0,
            "unhealthy": 0.0,
            "draining": 0.0,
            "dead": 0.0,
        }
        assert families["svllm_manager_evictions"].type == "counter"


async def test_an_adapters_counters_exist_from_registration(tmp_path: Path) -> None:
    """Like the cold-start counter: increase() sees an adapter's first load, a dashboard the adapter at once."""
    async with one_worker_core(tmp_path) as core:
        await core.register_model(ModelSpec(alias="base", model_name="/m/base", enable_lora=True, preload=False))
        await core.register_model(ModelSpec(alias="ad", base="base", adapter="/m/ad"))
        text = (await core.metrics_text()).decode()
        for name in (
            "svllm_adapter_loads_total",
            "svllm_adapter_load_seconds_total",
            "svllm_adapter_unloads_total",
            "svllm_adapter_load_failures_total",
        ):
            assert series(text, name) == [f'{name}{{model="ad"}} 0.0'], name  # the adapter's only, not the base's


async def test_usage_of_keys_is_exported_per_tenant_summed_over_routers(tmp_path: Path) -> None:
    """svllm_usage_*_total: what every router process reported (the ledger's tenant sums), per tenant and model,
    and across a manager restart (they are read from the database, not kept in memory)."""
    rows = [
        UsageRow(key_id="key-1", key_name="a", tenant="team-a", model="tiny", requests=3, prompt_tokens=12),
        UsageRow(key_id="key-2", key_name="b", tenant="team-b", model="tiny", requests=1, throttled=2),
    ]
    async with one_worker_core(tmp_path) as core:
        assert series((await core.metrics_text()).decode(), "svllm_usage_requests_total") == []
        core.usage.apply(UsageReport(reporter="router-1/x", seq=1, rows=rows))
        core.usage.apply(UsageReport(reporter="router-2/y", seq=1, rows=rows[:1]))
    async with one_worker_core(tmp_path) as core:
        text = (await core.metrics_text()).decode()
    assert series(text, "svllm_usage_requests_total") == [
        'svllm_usage_requests_total{tenant="team-a",model="tiny"} 6.0',
        'svllm_usage_requests_total{tenant="team-b",model="tiny"} 1.0',
    ]
    assert 'svllm_usage_prompt_tokens_total{tenant="team-a",model="tiny"} 24.0' in text
    assert 'svllm_usage_throttled_total{tenant="team-b",model="tiny"} 2.0' in text
    assert "# TYPE svllm_usage_completion_tokens_total counter" in text
