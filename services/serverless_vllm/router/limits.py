"""Rate limits of keys made at run time: token buckets for requests per minute (taken on arrival) and tokens per
minute (prompt + completion, taken from each answer's `usage`), and a count of requests in flight.

A bucket holds up to a minute's worth and refills continuously (rpm / 60 per second): a burst of `rpm` requests
passes at once, then one every 60 / rpm seconds. Tokens are known only once an answer ends, so a request is let in
while the token bucket is above zero and its tokens are taken afterwards (the bucket may go below zero: the next
requests wait until it has refilled). Keys without limits never reach this module.

Every request of a limited key passes here and its answer carries the six x-ratelimit-* headers, so this is on the
hot path: the limits are copied out of their pydantic model once per key into plain slots (as floats: arithmetic
mixing an int of more than 30 bits with a float converts it each time), a key object remembers its states (no lookup
by name per request), a key's header lines are written again only when its levels changed, and they go to the
server as one block (dataplane/server_protocol.py, HEAD_LINES) rather than as six headers through uvicorn's checks
(docs/benchmarks.md, keys made at run time).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..errors import APIError
from ..schemas import KeyLimits
from ..security.keys import ActiveKey

TENANT = "tenant:"  # a tenant's state is kept under this prefix and its name (key ids start with "key-")

_REQUESTS_HEAD = (
    b"x-ratelimit-limit-requests: %s\r\nx-ratelimit-remaining-requests: %d\r\nx-ratelimit-reset-requests: %s\r\n"
)
_TOKENS_HEAD = b"x-ratelimit-limit-tokens: %s\r\nx-ratelimit-remaining-tokens: %d\r\nx-ratelimit-reset-tokens: %s\r\n"


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


class KeyState:
    """One key's or tenant's buckets and in-flight count; its limits copied into slots (0: no such limit)."""

    __slots__ = (
        "_head",
        "_head_levels",
        "_requests_limit",
        "_tokens_limit",
        "in_flight",
        "limits",
        "max_concurrent",
        "requests",
        "rpm",
        "stamp",
        "tokens",
        "tpm",
    )

    def __init__(self, limits: KeyLimits, now: float) -> None:
        self.limits = limits  # what the buckets were made for: new limits (a key updated) start new buckets
        self.rpm = float(limits.rpm or 0)  # per minute (0: no such limit)
        self.tpm = float(limits.tpm or 0)
        self.max_concurrent = limits.max_concurrent or 0
        self.requests = self.rpm  # bucket levels: full
        self.tokens = self.tpm
        self.stamp = now
        self.in_flight = 0
        self._requests_limit = b"%d" % (limits.rpm or 0)  # the limits as their headers write them (made once)
        self._tokens_limit = b"%d" % (limits.tpm or 0)
        self._head_levels = (-1.0, -1.0)  # the levels its last lines were written for, and those lines
        self._head = b""

    def ready(self, now: float) -> bool:
        """The buckets refilled to `now`: whether every limit lets one more request in (nothing is taken)."""
        elapsed = now - self.stamp
        if elapsed > 0:  # a state made a moment after `now` was read gains nothing (and loses nothing)
            self.stamp = now
            if self.requests < self.rpm:
                level = self.requests + elapsed * self.rpm / 60.0
                self.requests = level if level < self.rpm else self.rpm
            if self.tokens < self.tpm:
                level = self.tokens + elapsed * self.tpm / 60.0
                self.tokens = level if level < self.tpm else self.tpm
        return not (
            (self.rpm and self.requests < 1.0)
            or (self.tpm and self.tokens <= 0.0)
            or (self.max_concurrent and self.in_flight >= self.max_concurrent)
        )

    def refusal(self, key: ActiveKey) -> APIError:
        """The 429 of a state that is not ready (with the headers of its limits). The message names the key or its
        tenant."""
        if self.rpm and self.requests < 1.0:
            wait, reached = (1.0 - self.requests) * 60.0 / self.rpm, f"{self.rpm:.0f} requests per minute"
        elif self.tpm and self.tokens <= 0.0:
            wait, reached = (1.0 - self.tokens) * 60.0 / self.tpm, f"{self.tpm:.0f} tokens per minute"
        else:
            wait, reached = 1.0, ""
        who = f"key '{key.name}'" if self.limits is key.limits else f"tenant '{key.tenant}'"
        if reached:
            message = f"rate limit reached for {who}: {reached}"
        else:
            message = f"{who} has {self.max_concurrent} requests in flight already (its limit)"
        headers = head_fields(self.head())
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        return APIError(429, message, "rate_limit_exceeded", headers)

    def head(self, tenant: KeyState | None = None) -> bytes:
        """The x-ratelimit-* lines of these buckets as they are now; the tenant's for a kind this key has none of."""
        if tenant is None:
            # A key under its limits finds its buckets full at each request: the same levels after it took its
            # request, so the same lines as the last time (written once, not per request).
            levels = (self.requests, self.tokens)
            if levels != self._head_levels:
                self._head_levels, self._head = levels, self._lines(None)
            return self._head
        return self._lines(tenant)

    def _lines(self, tenant: KeyState | None) -> bytes:
        out = b""
        of = self if self.rpm or tenant is None else tenant
        if of.rpm:
            level = of.requests
            out = _REQUESTS_HEAD % (of._requests_limit, level if level > 0.0 else 0, _reset(level, of.rpm))
        of = self if self.tpm or tenant is None else tenant
        if of.tpm:
            level = of.tokens
            out += _TOKENS_HEAD % (of._tokens_limit, level if level > 0.0 else 0, _reset(level, of.tpm))
        return out


def _reset(level: float, per_minute: float) -> bytes:
    """Time until a bucket at `level` is full again, as its header writes it."""
    seconds = (per_minute - level) * 60.0 / per_minute
    return b"%dms" % math.ceil(seconds * 1000) if seconds < 1.0 else duration(seconds).encode()


def head_fields(head: bytes) -> dict[str, str]:
    """Header lines (`name: value\\r\\n`...) as a dict."""
    fields = (line.decode().partition(": ") for line in head.split(b"\r\n") if line)
    return {name: value for name, _, value in fields}


class Grant:
    """One admitted request of a limited key: its rate-limit headers, and its slots until `finish`."""

    __slots__ = ("_clock", "_states", "head")

    def __init__(self, states: tuple[KeyState, ...], head: bytes, clock: Callable[[], float]) -> None:
        self._states = states  # the key's own (which may limit nothing), and its tenant's where it has limits
        self._clock = clock
        self.head = head  # the x-ratelimit-* header lines, as written on the answer

    @property
    def headers(self) -> dict[str, str]:
        return head_fields(self.head)

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers as an ASGI message lists them (servers that cannot write a block of lines)."""
        fields = (line.partition(b": ") for line in self.head.split(b"\r\n") if line)
        return [(name, value) for name, _, value in fields]

    def finish(self, tokens: int) -> None:
        """The request ended (once; later calls do nothing): the tokens its answer used are taken from the token
        buckets (a stream's as soon as its usage passes, before its client has seen its end) and its slots are
        free."""
        states = self._states
        if not states:
            return
        self._states = ()
        now = self._clock() if tokens else 0.0
        for state in states:
            if tokens and state.tpm:
                state.ready(now)  # refilled up to now before the tokens are taken
                state.tokens -= tokens
            if state.max_concurrent:
                state.in_flight -= 1


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
            state = self._states[name] = KeyState(limits, self._clock())
        return state

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the state of keys and tenants no longer in the table."""
        self._states = {k: v for k, v in self._states.items() if keep(k)}

    def states_of(self, key: ActiveKey) -> tuple[KeyState, ...]:
        """The key's own state (which may limit nothing), and its tenant's where it has limits. Remembered on the
        key object: its limits are fixed (a changed key is a new object), and forget() keeps the states of every
        key of the table."""
        if key.limit_states is not None and key.limit_states[0] is self:
            return key.limit_states[1]
        own = self.state(key.id, key.limits)
        states = (own,) if key.tenant_limits is None else (own, self.state(TENANT + key.tenant, key.tenant_limits))
        key.limit_states = (self, states)
        return states

    def admit(self, key: ActiveKey) -> Grant:
        """Let one request of `key` in, or raise a 429 with Retry-After and the x-ratelimit-* headers. The key's
        own limits and its tenant's must both allow it; the headers are the key's own limits where it has them."""
        now = self._clock()
        states = self.states_of(key)
        for state in states:
            if not state.ready(now):
                raise state.refusal(key)
        for state in states:
            if state.rpm:
                state.requests -= 1.0
            if state.max_concurrent:
                state.in_flight += 1
        own = states[0]
        return Grant(states, own.head(states[1] if len(states) > 1 else None), self._clock)
