"""Rate limits of keys made at run time: token buckets for requests per minute (taken on arrival) and tokens per
minute (prompt + completion, taken from each answer's `usage`), and a count of requests in flight.

A bucket holds up to a minute's worth and refills continuously (rpm / 60 per second): a burst of `rpm` requests
passes at once, then one every 60 / rpm seconds. Tokens are known only once an answer ends, so a request is let in
while the token bucket is above zero and its tokens are taken afterwards (the bucket may go below zero: the next
requests wait until it has refilled). Keys without limits never reach this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import APIError
from ..schemas import KeyLimits
from ..security.keys import ActiveKey


@dataclass(slots=True)
class Bucket:
    level: float
    stamp: float

    def refill(self, per_minute: int, now: float) -> float:
        if now > self.stamp:  # a bucket made a moment after `now` was read gains nothing (and loses nothing)
            self.level = min(float(per_minute), self.level + (now - self.stamp) * per_minute / 60.0)
            self.stamp = now
        return self.level

    def reset_in(self, per_minute: int) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (per_minute - self.level) * 60.0 / per_minute)


TENANT = "tenant:"  # a tenant's state is kept under this prefix and its name (key ids start with "key-")


@dataclass(slots=True)
class KeyState:
    limits: KeyLimits  # what the buckets were made for: new limits (a key updated) start new buckets
    requests: Bucket
    tokens: Bucket
    in_flight: int = 0
    limit_values: tuple[bytes, bytes] = (b"", b"")  # rpm and tpm as their headers write them (made once)


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


RawHeaders = list[tuple[bytes, bytes]]


class Grant:
    """One admitted request of a limited key: its rate-limit headers, and its slots until `finish`."""

    __slots__ = ("_now", "_open", "_parts", "raw_headers")

    def __init__(self, parts: list[tuple[KeyState, KeyLimits]], raw_headers: RawHeaders, now: Callable[[], float]):
        self._parts = parts  # the key's state and limits, and its tenant's
        self._now = now
        self._open = True
        self.raw_headers = raw_headers  # as the response carries them (encoded once, here)

    @property
    def headers(self) -> dict[str, str]:
        return _decoded(self.raw_headers)

    def finish(self, tokens: int) -> None:
        """The request ended (once; later calls do nothing): its slots are free and its tokens are taken."""
        if not self._open:
            return
        self._open = False
        for state, limits in self._parts:
            if limits.max_concurrent is not None:
                state.in_flight -= 1
            if limits.tpm is not None and tokens:
                state.tokens.refill(limits.tpm, self._now())
                state.tokens.level -= tokens


def _throttled(message: str, retry_after: float, headers: dict[str, str]) -> APIError:
    headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
    return APIError(429, message, "rate_limit_exceeded", headers)


_REQUESTS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKENS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def _raw_headers(limits: KeyLimits, state: KeyState) -> RawHeaders:
    """The x-ratelimit-* headers of one set of limits, as the buckets are now (refilled). Every answer of a limited
    key carries them: written as bytes (the limits' own once per key), not as text encoded again for the response."""
    out: RawHeaders = []
    if limits.rpm is not None:
        _bucket_headers(out, _REQUESTS, state.limit_values[0], state.requests, limits.rpm)
    if limits.tpm is not None:
        _bucket_headers(out, _TOKENS, state.limit_values[1], state.tokens, limits.tpm)
    return out


def _bucket_headers(out: RawHeaders, names: tuple[bytes, ...], limit: bytes, bucket: Bucket, per_minute: int) -> None:
    level = bucket.level
    reset = bucket.reset_in(per_minute)
    out.append((names[0], limit))
    out.append((names[1], b"%d" % level if level >= 1.0 else b"0"))  # %d of a float >= 0: its floor
    out.append((names[2], b"%dms" % math.ceil(reset * 1000) if reset < 1.0 else duration(reset).encode()))


def _decoded(raw: RawHeaders) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw}


def _check(limits: KeyLimits, state: KeyState, key: ActiveKey, tenant: bool) -> None:
    """Raise a 429 (with the headers of these limits) if one of them is reached; nothing is taken. The message
    names the key or its tenant, written only when refusing."""
    if limits.rpm is not None and state.requests.level < 1.0:
        wait = (1.0 - state.requests.level) * 60.0 / limits.rpm
        message = f"rate limit reached for {_who(key, tenant)}: {limits.rpm} requests per minute"
    elif limits.tpm is not None and state.tokens.level <= 0.0:
        wait = (1.0 - state.tokens.level) * 60.0 / limits.tpm
        message = f"rate limit reached for {_who(key, tenant)}: {limits.tpm} tokens per minute"
    elif limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
        wait = 1.0
        message = f"{_who(key, tenant)} has {limits.max_concurrent} requests in flight already (its limit)"
    else:
        return
    raise _throttled(message, wait, _decoded(_raw_headers(limits, state)))


def _who(key: ActiveKey, tenant: bool) -> str:
    return f"tenant '{key.tenant}'" if tenant else f"key '{key.name}'"


class Limiter:
    """Per key id and per tenant: buckets and in-flight counts (bounded by the key table's keys and tenants)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, KeyState] = {}

    def state(self, name: str, limits: KeyLimits) -> KeyState:
        state = self._states.get(name)
        if state is not None and state.limits is not limits:  # a new key table: the same limits, or new ones
            if state.limits == limits:
                state.limits = limits
            else:
                state = None
        if state is None:
            now = self._clock()
            state = self._states[name] = KeyState(
                limits,
                Bucket(float(limits.rpm or 0), now),
                Bucket(float(limits.tpm or 0), now),
                limit_values=(b"%d" % (limits.rpm or 0), b"%d" % (limits.tpm or 0)),
            )
        return state

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the state of keys and tenants no longer in the table."""
        self._states = {k: v for k, v in self._states.items() if keep(k)}

    def admit(self, key: ActiveKey) -> Grant:
        """Let one request of `key` in, or raise a 429 with Retry-After and the x-ratelimit-* headers. The key's
        own limits and its tenant's must both allow it; the headers are the key's own limits where it has them."""
        now = self._clock()
        parts: list[tuple[KeyState, KeyLimits]] = []
        if key.limits.limited():
            parts.append((self.state(key.id, key.limits), key.limits))
        if key.tenant_limits is not None:
            parts.append((self.state(TENANT + key.tenant, key.tenant_limits), key.tenant_limits))
        for state, limits in parts:
            if limits.rpm is not None:
                state.requests.refill(limits.rpm, now)
            if limits.tpm is not None:
                state.tokens.refill(limits.tpm, now)
            _check(limits, state, key, tenant=limits is key.tenant_limits)
        raw: RawHeaders = []
        for state, limits in parts:
            if limits.rpm is not None:
                state.requests.level -= 1.0
            if limits.max_concurrent is not None:
                state.in_flight += 1
            if not raw:
                raw = _raw_headers(limits, state)
            else:  # the tenant's, where the key has none of its own
                names = {name for name, _ in raw}
                raw += [(name, value) for name, value in _raw_headers(limits, state) if name not in names]
        return Grant(parts, raw, self._clock)
