"""API keys as data: what an operator sends to create or change a key, what is shown of it, and the key table the
manager pushes to routers (hashes only: a router never sees a secret it did not receive from a client)."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

from .models import Patch, Strict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"
# A key's model entry: an alias, or a glob pattern over aliases (`*`, `?`, `[...]`).
MODEL_PATTERN = r"^[A-Za-z0-9*?\[][A-Za-z0-9._:*?\[\]!-]{0,127}$"
GLOB_CHARS = frozenset("*?[")
_MODEL_RE = re.compile(MODEL_PATTERN)


class Priority(StrEnum):
    """Who waits first when capacity is short (router/fair_queue.py); shed last when the queue is full."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# A class as vLLM's request `priority` (lower is served first; a request without one has 0, as normal's).
ENGINE_PRIORITY = {Priority.HIGH: -1, Priority.NORMAL: 0, Priority.LOW: 1}


class KeyLimits(Strict):
    """Per key, or per tenant (shared by its keys): unset means no limit of that kind."""

    rpm: int | None = Field(None, ge=1, le=10_000_000, description="requests per minute")
    tpm: int | None = Field(None, ge=1, le=10_000_000_000, description="prompt + completion tokens per minute")
    max_concurrent: int | None = Field(None, ge=1, le=1_000_000, description="requests in flight at once")

    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


def _models(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("a key needs at least one model (an alias or a pattern such as '*')")
    for entry in value:
        if not _MODEL_RE.match(entry):
            raise ValueError(f"{entry!r} is not an alias or a glob pattern over aliases")
    return list(dict.fromkeys(value))


class KeySpec(Strict):
    """`POST /v1/keys`: a new key. The secret is made by the manager and returned once."""

    name: str = Field(pattern=NAME_PATTERN, description="unique among keys")
    tenant: str = Field(pattern=NAME_PATTERN, description="the team or customer the key belongs to")
    models: list[str] = Field(["*"], max_length=256, description="aliases or glob patterns the key may use")
    limits: KeyLimits = KeyLimits()
    priority: Priority = Priority.NORMAL
    expires_at: float | None = Field(None, gt=0, description="unix seconds after which the key is refused")

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        return _models(value)


class KeyPatch(Patch):
    """`PATCH /v1/keys/{id}`: the fields given are replaced (limits as a whole)."""

    tenant: str | None = Field(None, pattern=NAME_PATTERN)
    models: list[str] | None = Field(None, max_length=256)
    limits: KeyLimits | None = None
    priority: Priority | None = None
    expires_at: float | None = Field(None, gt=0)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _models(value)


class KeyInfo(BaseModel):
    """What is shown of a key: never its secret, only the first characters to recognise it by."""

    id: str
    name: str
    tenant: str
    models: list[str]
    limits: KeyLimits
    priority: Priority
    expires_at: float | None = None
    created_at: float
    revoked_at: float | None = None
    prefix: str  # the secret's first characters (its type tag and 4 random ones)


class KeyCreated(KeyInfo):
    secret: str  # returned once, by the call that made the key


class KeyEntry(KeyInfo):
    """A key as routers hold it: its info and the SHA-256 of its secret (hex)."""

    digest: str


class KeyTable(BaseModel):
    """Every key (revoked ones too, so a router answers 'revoked' rather than 'invalid'), pushed to routers by
    long-poll beside the routing table; or, with `base`, only the keys changed since version `base` of the same
    epoch (keys are never deleted: a revoked one stays, so a change is always an entry)."""

    version: int
    epoch: str  # changes when the manager restarts
    keys: list[KeyEntry]
    base: int | None = None  # None: every key; a version: the keys changed after it, the others as they were
    tenants: dict[str, KeyLimits] = {}  # tenant -> limits shared by all its keys (tenants without limits: absent)
