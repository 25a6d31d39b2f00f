"""How many awake replicas a model should have: a pure function of its policy, load and recent activity."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..schemas import ModelPolicy

# Scale down only when the remaining replicas would be at most this busy: with scale-up at 100% of the
# target this leaves a band in which nothing changes, so the replica count does not flap.
SCALE_DOWN_HEADROOM = 0.7


@dataclass
class ScaleState:
    """Per-model memory of the autoscaler (owned by the manager core)."""

    target: int = 0
    last_active: float = 0.0
    below_since: float | None = None


def next_target(
    policy: ModelPolicy, state: ScaleState, load: float, wake: bool, now: float, scale_down_delay_s: float
) -> int:
    """Return the new target (and update `state.below_since`).

    load: requests in flight plus queued at the routers. wake: a request waits with no ready replica.
    """
    current = state.target
    floor = policy.min_replicas
    if load > 0 or wake:
        floor = max(floor, 1)
    idle = load == 0 and not wake and now - state.last_active >= policy.idle_timeout_s
    if idle:
        state.below_since = None
        return policy.min_replicas

    needed = math.ceil(load / policy.target_concurrency) if load > 0 else 0
    up = min(policy.max_replicas, max(needed, floor))
    if up > current:
        state.below_since = None
        return up

    lowest = max(floor, 1) if current > 0 else floor
    if current > lowest and load <= policy.target_concurrency * (current - 1) * SCALE_DOWN_HEADROOM:
        if state.below_since is None:
            state.below_since = now
        elif now - state.below_since >= scale_down_delay_s:
            state.below_since = now  # the next step down waits a full delay again
            return current - 1
        return current
    state.below_since = None
    return min(max(current, floor), policy.max_replicas)
