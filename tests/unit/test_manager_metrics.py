"""The manager's /metrics stays proportional to what is running, not to the registry (10,000 models)."""

from __future__ import annotations

from pathlib import Path

from serverless_vllm.config import ManagerSettings
from serverless_vllm.manager.core import ManagerCore
from serverless_vllm.schemas import ModelSpec, WorkerRegistration

from .fleet import NOWHERE, Clock


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_per_model_series_stay_few_for_idle_models(tmp_path: Path) -> None:
    core = ManagerCore(ManagerSettings(db_path=str(tmp_path / "m.db"), heartbeat_timeout=10, model_dirs=["/"]),
                       clock=Clock())
    await core.start()
    try:
        await core.register_worker(WorkerRegistration(worker_id="w1", url=NOWHERE, cpu_slots=1))
        await core.register_model(ModelSpec(alias="hot", model_name="/m/hot", min_replicas=1))
        for i in range(3):
            await core.register_model(ModelSpec(alias=f"idle-{i}", model_name=f"/m/idle{i}", preload=False))
        await core.reconcile()
        text = core.metrics_text().decode()

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
        assert "svllm_cold_start_duration_seconds_count{model=\"idle-0\"}" not in text
    finally:
        await core.close()
