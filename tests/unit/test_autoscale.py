"""The autoscaler: cold start on demand, scale up on load, hysteresis on the way down, scale to zero."""

from serverless_vllm.manager.autoscale import ScaleState, next_target
from serverless_vllm.schemas import ModelPolicy

POLICY = ModelPolicy(min_replicas=0, max_replicas=3, idle_timeout_s=60, target_concurrency=4)


def step(state: ScaleState, load: float, now: float, wake: bool = False) -> int:
    state.target = next_target(POLICY, state, load, wake, now, scale_down_delay_s=10)
    if load or wake:
        state.last_active = now
    return state.target


def test_wake_brings_one_replica_from_zero() -> None:
    state = ScaleState(target=0, last_active=0)
    assert step(state, 0, now=100, wake=True) == 1


def test_load_above_target_adds_replicas_up_to_max() -> None:
    state = ScaleState(target=1, last_active=0)
    assert step(state, 5, now=1) == 2
    assert step(state, 50, now=2) == 3


def test_scale_down_waits_and_has_a_dead_band() -> None:
    state = ScaleState(target=2, last_active=0)
    # 3 in flight: below 2*4 but above 1*4*0.7: stays at 2 however long.
    for t in range(1, 40):
        assert step(state, 3, now=t) == 2
    # 2 in flight: low enough, but only after the delay.
    assert step(state, 2, now=40) == 2
    assert step(state, 2, now=45) == 2
    assert step(state, 2, now=51) == 1


def test_idle_model_scales_to_min() -> None:
    state = ScaleState(target=1, last_active=0)
    assert step(state, 0, now=30) == 1
    assert step(state, 0, now=61) == 0


def test_min_replicas_is_kept() -> None:
    policy = ModelPolicy(min_replicas=1, max_replicas=2, idle_timeout_s=5)
    state = ScaleState(target=2, last_active=0)
    assert next_target(policy, state, 0, False, 100, 10) == 1
