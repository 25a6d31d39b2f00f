"""How the router chooses one of a model's ready replicas: the policy behind RouteTable.pick.

The table keeps what every policy needs (the ready replicas of each alias, the requests this router has in flight
per replica) and hands a policy the replicas it may use; the policy only chooses. Each model names its policy at
registration (`routing`, carried by its route): `session` (the default), `least_loaded` or `prefix`
(router/prefix.py). A new way of routing is a new RoutingPolicy, with no change to the table: the seam of
production-stack's RoutingInterface and Ray Serve's RequestRouter.

What a policy may know of a request is its `RequestKey`: the session key, and the parsed body, which only a policy
that needs it reads (the prefix policy hashes the prompt; no other model's request pays for that).

`pick` runs once per request (twice on a retry): a policy should allocate as little as it can.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..schemas import Endpoint

__all__ = ["NO_KEY", "LeastLoaded", "RequestKey", "RoutingPolicy", "SessionAffinity", "default_policy"]


class RequestKey:
    """One request as a routing policy sees it.

    `session`: the session key (x-session-id, else the body's `user`), or None. `payload`: the parsed JSON body
    (read only; parsed once by dataplane/body.py), `family`: its endpoint family (`chat`, `completion`, ...).
    `prefix`: the prefix policy's block hashes of the prompt, computed at the first pick and kept for a retry."""

    __slots__ = ("family", "payload", "prefix", "session")

    def __init__(self, session: str | None = None, payload: Mapping[str, Any] | None = None, family: str = "") -> None:
        self.session = session
        self.payload = payload
        self.family = family
        self.prefix: list[int] | None = None


NO_KEY = RequestKey()  # a request that says nothing about itself: no session key, no prompt
NO_KEY.prefix = []  # no blocks, so no policy writes to it


class RoutingPolicy(Protocol):
    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
    ) -> Endpoint:
        """One of `candidates` for a request to `alias`.

        `candidates`: never empty; the alias's ready replicas less those this request already tried. Read only
        (it may be the routing table's own list). `in_flight`: requests this router has in flight, by replica id;
        it has an entry for every candidate (0 when none). Read only. `key`: what the request says about itself."""
        ...


class LeastLoaded:
    """The fewer requests in flight of two candidates drawn at random (power of two choices); ties at random.

    Two, not all: routers that each see only their own requests do not all pile onto the one replica that looks
    idle to every one of them."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
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
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
    ) -> Endpoint:
        session = key.session
        if session is None:
            return self.fallback.pick(alias, candidates, in_flight, key)
        return max(candidates, key=lambda e: _rendezvous_score(session, e.replica_id))


def default_policy(rng: random.Random | None = None) -> RoutingPolicy:
    """Routing `session`, every model's before `routing` existed: session affinity when a request has a key, else
    least loaded of two."""
    return SessionAffinity(LeastLoaded(rng))
