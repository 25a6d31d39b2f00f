"""The router's keys from the manager's key table: a client key is checked by one SHA-256 and one dict lookup by
digest, never a manager call. A wrong key costs the router that hash; guessing a key of 256 random bits is
hopeless, and no lookup depends on a secret's characters (the dict is keyed by the digest, not the secret).

Keys of the environment (SVLLM_API_KEYS) stay in security/auth.py: they are client keys without limits.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ..errors import APIError
from ..schemas import KeyEntry, KeyLimits, KeyTable, Priority
from ..schemas.keys import GLOB_CHARS

if TYPE_CHECKING:  # the router's row type, named for the checker only (the router imports this module)
    from ..router.limits import KeyState, Limiter
    from ..router.usage import Usage

# Where the guard puts the verified key in the ASGI scope (absent: an environment key, the admin key, or auth off).
KEY_SCOPE = "svllm.api_key"
_ALLOWED_CACHE = 1024  # aliases remembered per key (bounded: a client cannot grow it with random names)


def hidden_model(alias: str) -> APIError:
    """A model outside a key's list: the answer for a model that does not exist (the key learns nothing)."""
    return APIError(404, f"The model '{alias}' does not exist", "model_not_found")


@dataclass(slots=True, eq=False)
class ActiveKey:
    """One key as a router enforces it. `limits` are this router's share of the key's limits."""

    id: str
    name: str
    tenant: str
    priority: Priority
    limits: KeyLimits
    expires_at: float | None
    revoked: bool
    exact: frozenset[str]
    patterns: tuple[str, ...]
    tenant_limits: KeyLimits | None = None  # this router's share of the limits its tenant's keys share
    limited: bool = False  # any limit, its own or its tenant's (else the limiter is skipped)
    # What it was made from (its entry, its tenant's limits): a new table with the same keeps this object.
    source: tuple[KeyEntry, KeyLimits | None] | None = None
    # The router's usage rows of this key by registered model (router/usage.py): found in one lookup per request,
    # and made anew with the key when its entry changes (another tenant or name counts in other rows).
    usage_rows: dict[str, Usage] = field(default_factory=dict)
    # Its limit states in the router's limiter, and that limiter (router/limits.py): found without a lookup.
    limit_states: tuple[Limiter, tuple[KeyState, ...]] | None = None
    _allowed: dict[str, bool] = field(default_factory=dict)

    def allows(self, alias: str) -> bool:
        if alias in self.exact:
            return True
        if not self.patterns:
            return False
        known = self._allowed.get(alias)
        if known is None:
            known = any(fnmatchcase(alias, p) for p in self.patterns)
            if len(self._allowed) < _ALLOWED_CACHE:
                self._allowed[alias] = known
        return known


def share_of(limits: KeyLimits, share: float) -> KeyLimits:
    """This router's part of a key's limits: each rounded up (never 0), so the sum over N routers may exceed the
    limit by up to N - 1 per kind (documented in docs/tenants.md)."""
    if share >= 1.0 or not limits.limited():
        return limits
    scale = {k: max(1, math.ceil(v * share)) for k, v in limits.model_dump().items() if v is not None}
    return KeyLimits(**scale)


def active(entry: KeyEntry, share: float, tenant_limits: KeyLimits | None = None) -> ActiveKey:
    patterns = tuple(m for m in entry.models if GLOB_CHARS.intersection(m))
    tenant = share_of(tenant_limits, share) if tenant_limits is not None and tenant_limits.limited() else None
    return ActiveKey(
        id=entry.id,
        name=entry.name,
        tenant=entry.tenant,
        priority=entry.priority,
        limits=share_of(entry.limits, share),
        expires_at=entry.expires_at,
        revoked=entry.revoked_at is not None,
        exact=frozenset(m for m in entry.models if m not in patterns),
        patterns=patterns,
        tenant_limits=tenant,
        limited=entry.limits.limited() or tenant is not None,
        source=(entry, tenant_limits),
    )


def _not_loaded() -> APIError:
    return APIError(
        503,
        "this router has not loaded its API keys yet (the manager is unreachable): try again shortly",
        "keys_not_loaded",
        {"Retry-After": "2"},
    )


class KeyRing:
    """Digest -> key: new dicts for each key table version, whole or its changes (read-only in between: no lock on
    the hot path).

    A key whose entry (and tenant's limits) did not change keeps its ActiveKey across versions: a table of 10,000
    keys reloaded for each change otherwise makes and frees 10,000 long-lived objects a time, and a router that
    went through a burst of changes served every later request ~10% slower than one that loaded the table once
    (its heap scattered: docs/benchmarks.md, keys made at run time)."""

    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self._share = share
        self._clock = clock
        self._by_digest: dict[bytes, ActiveKey] = {}
        self._by_id: dict[str, ActiveKey] = {}
        self._tenants: dict[str, KeyLimits] = {}
        # Read by the guard on every request (an attribute, not a call): whether to look a token up here. True until
        # the first table: a token then is not known to be wrong (check_digest).
        self.any = True
        self.version = -1  # the manager's versions start at 1: -1 until the first table
        self.epoch = ""

    def update(self, table: KeyTable) -> None:
        """Load a whole table, or apply the keys changed since this ring's version (`table.base`; the caller checks
        that this ring has that version or a later one)."""
        tenants = table.tenants
        before = self._by_digest
        keys: dict[bytes, ActiveKey] = {}
        if table.base is not None:
            keys = dict(before)
            if tenants != self._tenants:  # a tenant's shared limits changed: its keys are made again
                for digest, key in before.items():
                    if key.source is not None and tenants.get(key.tenant) != key.source[1]:
                        keys[digest] = active(key.source[0], self._share, tenants.get(key.tenant))
        for entry in table.keys:
            digest = bytes.fromhex(entry.digest)
            old = before.get(digest)
            tenant_limits = tenants.get(entry.tenant)
            if old is not None and old.source == (entry, tenant_limits):
                keys[digest] = old
            else:
                keys[digest] = active(entry, self._share, tenant_limits)
        self._by_digest = keys
        self.any = bool(keys)
        self._by_id = {k.id: k for k in keys.values()}
        self._tenants = tenants
        self.version, self.epoch = table.version, table.epoch

    def __len__(self) -> int:
        return len(self._by_digest)

    def tenants(self) -> dict[str, KeyLimits]:
        """Every tenant's limits as the manager has them (the whole, not this router's share)."""
        return dict(self._tenants)

    def by_id(self, key_id: str) -> ActiveKey | None:
        return self._by_id.get(key_id)

    def check(self, token: bytes) -> ActiveKey | APIError | None:
        """The key this token is, an error for a revoked or expired one, None for an unknown token."""
        return self.check_digest(hashlib.sha256(token).digest())

    def check_digest(self, digest: bytes) -> ActiveKey | APIError | None:
        """`check`, for a token's SHA-256."""
        key = self._by_digest.get(digest)
        if key is None:
            # Before the first table (a router started while the manager is away) a key made at run time cannot be
            # told from a wrong one: try again (the openai client does on a 503), rather than a 401 that ends it.
            return None if self.version >= 0 else _not_loaded()
        if key.revoked:
            return APIError(401, "this API key was revoked", "revoked_api_key", {"WWW-Authenticate": "Bearer"})
        if key.expires_at is not None and self._clock() >= key.expires_at:
            return APIError(401, "this API key has expired", "expired_api_key", {"WWW-Authenticate": "Bearer"})
        return key
