"""API keys as data: create (the secret made here and returned once), list, show, update, revoke, and the key
table routers long-poll (`wait`), so that checking a key never calls the manager.

Secrets are 256 random bits; only their SHA-256 is stored and pushed. A fast hash is enough for secrets of that
entropy (a slow one such as bcrypt or argon2 protects guessable passwords; nobody guesses 2^256), and it lets a
router verify a key with one hash and one dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Container

from ..errors import APIError
from ..schemas import KeyCreated, KeyEntry, KeyInfo, KeyLimits, KeyPatch, KeySpec, KeyTable
from ..schemas.keys import GLOB_CHARS, NAME_PATTERN
from .key_store import KeyStore

SECRET_PREFIX = "sk-svllm-"
_SHOWN_CHARS = len(SECRET_PREFIX) + 4
_TENANT_RE = re.compile(NAME_PATTERN)


def digest_hex(secret: str | bytes) -> str:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


def _info(entry: KeyEntry) -> KeyInfo:
    return KeyInfo.model_validate(entry.model_dump(exclude={"digest"}))


class KeyRegistry:
    def __init__(
        self, db_path: str, epoch: str, aliases: Callable[[], Container[str]], clock: Callable[[], float] = time.time
    ) -> None:
        self._store = KeyStore(db_path)
        self._epoch = epoch
        self._aliases = aliases  # the registered models, to refuse keys naming unknown ones
        self._clock = clock  # wall clock: expiries are unix seconds
        self._keys: dict[str, KeyEntry] = {e.id: e for e in self._store.load()}
        self._names: dict[str, str] = {e.name: e.id for e in self._keys.values()}  # names are unique, and fixed
        self._changed_at: dict[str, int] = {}  # key id -> the version its entry last changed in (none: loaded)
        self._tenants: dict[str, KeyLimits] = self._store.load_tenants()
        self._version = 1
        self._table: KeyTable | None = None
        self._changed: asyncio.Event | None = None

    # ------------------------------------------------------------------ the operator's calls

    def create(self, spec: KeySpec) -> KeyCreated:
        self._check_models(spec.models)
        if spec.name in self._names:
            raise APIError(400, f"a key named '{spec.name}' exists already", "duplicate_key_name")
        self._check_expiry(spec.expires_at)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        entry = KeyEntry(
            id=f"key-{secrets.token_hex(8)}",
            created_at=self._clock(),
            prefix=secret[:_SHOWN_CHARS],
            digest=digest_hex(secret),
            **spec.model_dump(),
        )
        self._put(entry)
        return KeyCreated(secret=secret, **_info(entry).model_dump())

    def all(self) -> list[KeyInfo]:
        return [_info(e) for e in self._keys.values()]

    def get(self, ref: str) -> KeyInfo:
        return _info(self._find(ref))

    def update(self, ref: str, patch: KeyPatch) -> KeyInfo:
        entry = self._find(ref)
        if entry.revoked_at is not None:
            raise APIError(400, f"key '{entry.name}' is revoked: create a new one", "key_revoked")
        changes = patch.model_dump(exclude_unset=True)
        if patch.models is not None:
            self._check_models(patch.models)
        if "expires_at" in changes:
            self._check_expiry(patch.expires_at)
        nulls = sorted(k for k, v in changes.items() if v is None and k != "expires_at")  # null expiry: none
        if nulls:
            raise APIError(400, f"{', '.join(nulls)} cannot be null (send limits {{}} for none)", "invalid_request")
        updated = entry.model_copy(update={k: getattr(patch, k) for k in changes})
        self._put(updated)
        return _info(updated)

    def revoke(self, ref: str) -> KeyInfo:
        entry = self._find(ref)
        if entry.revoked_at is None:
            entry = entry.model_copy(update={"revoked_at": self._clock()})
            self._put(entry)
        return _info(entry)

    def set_tenant_limits(self, tenant: str, limits: KeyLimits) -> KeyLimits:
        """Limits shared by every key of `tenant` (besides each key's own); no values: none."""
        if not _TENANT_RE.match(tenant):
            raise APIError(400, f"{tenant!r} is not a tenant name ({NAME_PATTERN})", "invalid_tenant")
        self._store.save_tenant(tenant, limits)
        if limits.limited():
            self._tenants[tenant] = limits
        else:
            self._tenants.pop(tenant, None)
        self._changed_now()
        return limits

    # ------------------------------------------------------------------ the routers' long-poll

    async def wait(self, after_version: int, epoch: str, timeout: float) -> KeyTable:
        """Return as soon as the key table is newer than `after_version` (or from another epoch). A router that has
        a version of this epoch gets only the keys changed since (none after a quiet long-poll): a table of
        10,000 keys is 3.3 MB of JSON that each router would parse again for every change and every timeout."""
        if epoch == self._epoch and after_version >= self._version:
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        if epoch == self._epoch and 0 < after_version <= self._version:
            return self.changes(after_version)
        return self.table()

    def table(self) -> KeyTable:
        if self._table is None:
            self._table = KeyTable(
                version=self._version, epoch=self._epoch, keys=list(self._keys.values()), tenants=dict(self._tenants)
            )
        return self._table

    def changes(self, since: int) -> KeyTable:
        """The keys changed after version `since` (every tenant's limits: a few, sent whole)."""
        changed = [self._keys[k] for k, at in self._changed_at.items() if at > since]
        return KeyTable(version=self._version, epoch=self._epoch, keys=changed, tenants=dict(self._tenants), base=since)

    def close(self) -> None:
        self._store.close()

    # ------------------------------------------------------------------ internals

    def _put(self, entry: KeyEntry) -> None:
        self._store.save(entry)
        self._keys[entry.id] = entry
        self._names[entry.name] = entry.id
        self._changed_now()
        self._changed_at[entry.id] = self._version

    def _changed_now(self) -> None:
        self._version += 1
        self._table = None
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()  # every waiting router's poll returns the new table

    def _find(self, ref: str) -> KeyEntry:
        entry = self._keys.get(ref) or self._keys.get(self._names.get(ref, ""))
        if entry is None:
            raise APIError(404, f"no key with id or name '{ref}'", "key_not_found")
        return entry

    def _check_models(self, models: list[str]) -> None:
        aliases = self._aliases()
        unknown = [m for m in models if not GLOB_CHARS.intersection(m) and m not in aliases]
        if unknown:
            raise APIError(
                400,
                f"unknown model(s) {', '.join(unknown)}: a key names registered aliases or glob patterns",
                "unknown_model",
            )

    def _check_expiry(self, expires_at: float | None) -> None:
        if expires_at is not None and expires_at <= self._clock():
            raise APIError(400, "expires_at is in the past", "invalid_expiry")
