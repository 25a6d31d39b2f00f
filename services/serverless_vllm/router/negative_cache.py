"""Aliases the manager just said it does not know: a short, bounded memory of its 404s.

A client that keeps asking for a wrong model name would otherwise cost one manager call per request. The router
remembers each such 404 for a few seconds (UNKNOWN_MODEL_TTL) and answers it again itself. It is asked only when
the routing table does not know the alias: a model registered since is in the table (long-poll) and served at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_MAX_ENTRIES = 10_000


class NegativeCache:
    """alias -> (when the manager answered 404, its message); at most `max_entries` (oldest out), each valid for
    `ttl_s` seconds (0: nothing is remembered)."""

    def __init__(
        self, ttl_s: float, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        # Oldest first: every entry is (re)inserted at the end, and all share one TTL.
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, alias: str) -> str | None:
        """The remembered 404 message of `alias`, or None (never seen, or expired: then forgotten)."""
        entry = self._entries.get(alias)
        if entry is None:
            return None
        if self._clock() - entry[0] >= self._ttl:
            del self._entries[alias]
            return None
        return entry[1]

    def add(self, alias: str, message: str) -> None:
        if self._ttl <= 0 or self._max <= 0:
            return
        now = self._clock()
        self._entries.pop(alias, None)
        self._entries[alias] = (now, message)
        # Expired entries go from the front first, then the oldest beyond the bound.
        while self._entries:
            oldest, (when, _) = next(iter(self._entries.items()))
            if now - when < self._ttl and len(self._entries) <= self._max:
                break
            del self._entries[oldest]

    def discard(self, alias: str) -> None:
        self._entries.pop(alias, None)
