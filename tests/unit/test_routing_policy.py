"""Routing policies: least loaded of two, session affinity by rendezvous hashing, and RouteTable's policy seam."""

import random
from collections.abc import Mapping, Sequence

import pytest
from serverless_vllm.router.policy import (
    NO_KEY,
    LeastLoaded,
    RequestKey,
    RoutingPolicy,
    SessionAffinity,
    default_policy,
)
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import Endpoint, ModelRoute, ModelState, RoutingTable


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(replica_id=f"r{i}", worker_id=f"w{i}", url=f"http://w{i}") for i in range(n)]


def routing(eps: list[Endpoint], version: int = 1) -> RoutingTable:
    return RoutingTable(version=version, epoch="e", models={"m": ModelRoute(state=ModelState.READY, endpoints=eps)})


def table_of(eps: list[Endpoint], policy: RoutingPolicy | None = None) -> RouteTable:
    table = RouteTable(policy=policy) if policy is not None else RouteTable(rng=random.Random(3))
    table.update(routing(eps))
    return table


class Never:
    """A fallback that must not be asked."""

    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
    ) -> Endpoint:
        raise AssertionError("the fallback was asked")


# ---------------------------------------------------------------- LeastLoaded (power of two choices)


def test_least_loaded_picks_the_less_loaded_of_two() -> None:
    a, b = endpoints(2)
    policy = LeastLoaded(random.Random(0))
    for load in ({"r0": 3, "r1": 1}, {"r0": 0, "r1": 7}):
        want = a if load["r0"] < load["r1"] else b
        assert {policy.pick("m", [a, b], load, NO_KEY).replica_id for _ in range(50)} == {want.replica_id}


def test_least_loaded_compares_two_random_candidates_of_many() -> None:
    eps = endpoints(6)
    load = {e.replica_id: 10 + i for i, e in enumerate(eps)}  # r0 least loaded, r5 most
    policy = LeastLoaded(random.Random(0))
    picked = [policy.pick("m", eps, load, NO_KEY).replica_id for _ in range(600)]
    # Never the most loaded (it always loses its pair); often not the least loaded (it is drawn 1 time in 3).
    assert "r5" not in picked
    assert set(picked) == {"r0", "r1", "r2", "r3", "r4"}
    # Each replica wins about as often as the pairs it is the lower of: r0 in 5 of the 15 pairs, r4 in 1.
    assert picked.count("r0") > 3 * picked.count("r4")


def test_least_loaded_breaks_ties_at_random() -> None:
    eps = endpoints(2)
    policy = LeastLoaded(random.Random(0))
    assert {policy.pick("m", eps, {"r0": 2, "r1": 2}, NO_KEY).replica_id for _ in range(50)} == {"r0", "r1"}


def test_least_loaded_does_not_change_its_inputs() -> None:
    eps = endpoints(5)
    snapshot = list(eps)
    load = {e.replica_id: 0 for e in eps}
    LeastLoaded(random.Random(0)).pick("m", eps, load, NO_KEY)
    assert eps == snapshot and load == dict.fromkeys(load, 0)


# ---------------------------------------------------------------- SessionAffinity (rendezvous hashing)


def test_affinity_is_stable_and_ignores_load() -> None:
    eps = endpoints(5)
    policy = SessionAffinity(Never())
    first = policy.pick("m", eps, {e.replica_id: 0 for e in eps}, RequestKey("alice"))
    busy = {e.replica_id: (100 if e.replica_id == first.replica_id else 0) for e in eps}
    assert {policy.pick("m", eps, busy, RequestKey("alice")).replica_id for _ in range(20)} == {first.replica_id}
    # The candidates' order does not matter either.
    assert policy.pick("m", list(reversed(eps)), busy, RequestKey("alice")).replica_id == first.replica_id


def test_affinity_spreads_sessions_over_replicas() -> None:
    eps = endpoints(4)
    policy = SessionAffinity(Never())
    load = {e.replica_id: 0 for e in eps}
    chosen = [policy.pick("m", eps, load, RequestKey(f"session-{i}")).replica_id for i in range(400)]
    assert set(chosen) == {"r0", "r1", "r2", "r3"}
    assert min(chosen.count(r) for r in set(chosen)) > 50  # about 100 each


def test_affinity_moves_only_when_its_replica_goes() -> None:
    eps = endpoints(5)
    policy = SessionAffinity(Never())
    load = {e.replica_id: 0 for e in eps}
    sessions = [f"session-{i}" for i in range(200)]
    before = {s: policy.pick("m", eps, load, RequestKey(s)).replica_id for s in sessions}
    gone = "r2"
    after = {
        s: policy.pick("m", [e for e in eps if e.replica_id != gone], load, RequestKey(s)).replica_id for s in sessions
    }
    moved = {s for s in sessions if before[s] != after[s]}
    assert moved == {s for s in sessions if before[s] == gone} and moved  # exactly r2's sessions, and some
    assert all(after[s] != gone for s in moved)
    # A replica added takes sessions only to itself: none moves between the old ones.
    added = [*eps, Endpoint(replica_id="r9", worker_id="w9", url="http://w9")]
    grown = {s: policy.pick("m", added, {**load, "r9": 0}, RequestKey(s)).replica_id for s in sessions}
    assert all(grown[s] in (before[s], "r9") for s in sessions)


def test_requests_without_a_key_go_to_the_fallback() -> None:
    eps = endpoints(3)
    asked: list[tuple[str, int, str | None]] = []

    class Last:
        def pick(
            self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
        ) -> Endpoint:
            asked.append((alias, len(candidates), key.session))
            return candidates[-1]

    policy = SessionAffinity(Last())
    assert policy.pick("m", eps, {}, NO_KEY).replica_id == "r2"
    assert asked == [("m", 3, None)]
    policy.pick("m", eps, {}, RequestKey("alice"))
    assert len(asked) == 1  # a keyed request is the affinity's own


def test_default_policy_is_affinity_over_least_loaded() -> None:
    policy = default_policy(random.Random(0))
    assert isinstance(policy, SessionAffinity) and isinstance(policy.fallback, LeastLoaded)


# ---------------------------------------------------------------- RouteTable's seam


class Recording:
    """Always the last candidate; records what the table handed over."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, int], str | None]] = []

    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
    ) -> Endpoint:
        ids = [e.replica_id for e in candidates]
        self.calls.append((alias, ids, {r: in_flight[r] for r in ids}, key.session))
        return candidates[-1]


def test_table_uses_the_policy_given() -> None:
    policy = Recording()
    table = table_of(endpoints(3), policy)
    table.started("m", endpoints(3)[0])
    assert table.pick("m").replica_id == "r2"
    assert table.pick("m", frozenset({"r2"}), RequestKey("alice")).replica_id == "r1"
    assert policy.calls == [
        ("m", ["r0", "r1", "r2"], {"r0": 1, "r1": 0, "r2": 0}, None),
        ("m", ["r0", "r1"], {"r0": 1, "r1": 0}, "alice"),
    ]


def test_table_answers_none_without_asking_the_policy() -> None:
    policy = Recording()
    table = table_of(endpoints(2), policy)
    assert table.pick("unknown") is None
    assert table.pick("m", frozenset({"r0", "r1"})) is None
    assert table_of([], policy).pick("m") is None
    assert RouteTable(policy=policy).pick("m") is None
    assert policy.calls == []


def test_table_default_policy_is_least_loaded_with_affinity() -> None:
    table = table_of(endpoints(2))
    busy = table.pick("m")
    assert busy is not None
    table.started("m", busy)
    assert {table.pick("m").replica_id for _ in range(20)} == {"r1" if busy.replica_id == "r0" else "r0"}
    keyed = {table.pick("m", key=RequestKey("alice")).replica_id for _ in range(20)}
    assert len(keyed) == 1


def test_in_flight_reads_zero_for_a_replica_never_counted() -> None:
    """The table keeps its promise to policies: every candidate has an in-flight entry."""
    policy = Recording()
    table = table_of(endpoints(2), policy)
    table.update(routing(endpoints(4), version=2))
    table.pick("m")
    assert policy.calls[-1][2] == {"r0": 0, "r1": 0, "r2": 0, "r3": 0}


def test_rng_and_policy_together_are_refused() -> None:
    with pytest.raises(ValueError):
        RouteTable(rng=random.Random(0), policy=LeastLoaded())
