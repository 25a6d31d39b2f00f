"""How many awake replicas a model should have (`next_target`: a pure function of its policy, load and recent
activity), and that load as the routers report it (`Demand`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..schemas import DemandReport, ModelPolicy

# A router's load report counts for this long; after that the router is presumed gone.
DEMAND_TTL_S = 5.0

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


class Demand:
    """The routers' latest load reports and the models they asked to wake (owned by the manager core)."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, DemandReport]] = {}  # router id -> (when, its last report)
        self._wake: set[str] = set()

    def record(self, report: DemandReport, now: float) -> None:
        self._reports[report.router_id] = (now, report)

    def wake(self, aliases: Iterable[str]) -> bool:
        """Ask for these models to be woken at the next pass; True if any was not asked for already."""
        new = set(aliases) - self._wake
        if new:
            self._wake |= new
        return bool(new)

    def take_wakes(self) -> set[str]:
        """The models asked to wake since the last call (a pass takes them all)."""
        wakes, self._wake = self._wake, set()
        return wakes

    def loads(self, now: float) -> dict[str, float]:
        """alias -> requests in flight plus queued, summed over the routers heard from within DEMAND_TTL_S."""
        loads: dict[str, float] = {}
        for router_id, (at, report) in list(self._reports.items()):
            if now - at > DEMAND_TTL_S:
                del self._reports[router_id]
                continue
            for alias, load in report.models.items():
                loads[alias] = loads.get(alias, 0.0) + load.in_flight + load.queued
        return loads

    def replica_loads(self, now: float) -> dict[str, int]:
        """replica id -> requests in flight there, summed over the routers heard from within DEMAND_TTL_S (a router
        names only its busy replicas): which replica to remove first (manager/draining.py)."""
        busy: dict[str, int] = {}
        for at, report in self._reports.values():
            if now - at <= DEMAND_TTL_S:
                for load in report.models.values():
                    for replica_id, n in load.replicas.items():
                        busy[replica_id] = busy.get(replica_id, 0) + n
        return busy
