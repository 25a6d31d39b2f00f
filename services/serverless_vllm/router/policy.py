"""How the router chooses one of a model's ready replicas: the policy behind RouteTable.pick.

The table keeps what every policy needs (the ready replicas of each alias, the requests this router has in flight
per replica) and hands a policy the replicas it may use; the policy only chooses. A new way of routing (prefix
or adapter aware, say) is a new RoutingPolicy given to RouteTable(policy=...), with no change to the table: the
seam of production-stack's RoutingInterface and Ray Serve's RequestRouter.

The default is today's: the fewer requests in flight of two replicas drawn at random (power of two choices),
and, for a request with a session key, the replica that key hashes to (rendezvous hashing).

`pick` runs once per request (twice on a retry): a policy should allocate as little as it can.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from ..schemas import Endpoint

__all__ = ["LeastLoaded", "RoutingPolicy", "SessionAffinity", "default_policy"]


class RoutingPolicy(Protocol):
    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], affinity: str | None
    ) -> Endpoint:
        """One of `candidates` for a request to `alias`.

        `candidates`: never empty; the alias's ready replicas less those this request already tried. Read only
        (it may be the routing table's own list). `in_flight`: requests this router has in flight, by replica id;
        it has an entry for every candidate (0 when none). Read only. `affinity`: the request's session key
        (x-session-id, else the body's `user`), or None."""
        ...


class LeastLoaded:
    """The fewer requests in flight of two candidates drawn at random (power of two choices); ties at random.

    Two, not all: routers that each see only their own requests do not all pile onto the one replica that looks
    idle to every one of them."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], affinity: str | None
    ) -> Endpoint:
        if len(candidates) > 2:
            candidates = self._rng.sample(candidates, 2)
        low = min(in_flight[e.replica_id] for e in candidates)
        return self._rng.choice([e for e in candidates if in_flight[e.replica_id] == low])


def _rendezvous_score(affinity: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{affinity}|{replica_id}".encode(), digest_size=8).digest()


class SessionAffinity:
    """A request with a session key goes to the candidate that scores highest for that key (rendezvous hashing):
    the same replica while it exists; when it goes, only its sessions move, each to its next-highest. Requests
    without a key are `fallback`'s to place."""

    __slots__ = ("fallback",)

    def __init__(self, fallback: RoutingPolicy) -> None:
        self.fallback = fallback

    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], affinity: str | None
    ) -> Endpoint:
        if affinity is None:
            return self.fallback.pick(alias, candidates, in_flight, None)
        return max(candidates, key=lambda e: _rendezvous_score(affinity, e.replica_id))


def default_policy(rng: random.Random | None = None) -> RoutingPolicy:
    """Session affinity when a request has a key, else least loaded of two."""
    return SessionAffinity(LeastLoaded(rng))
