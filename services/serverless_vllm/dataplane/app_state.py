"""A service's runtime objects, made when it starts, for the routes that were declared before they existed.

An app's routes are built with the app; its clients, tables and background tasks are made in its lifespan (they
bind to the event loop that runs it). The lifespan puts them, as one typed object, in an AppState; routes are
given `state.get`, which returns that object or says plainly that the service has not started.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["AppState", "NotStartedError"]

T = TypeVar("T")


class NotStartedError(RuntimeError):
    """A route or collector ran before its service's lifespan had started it."""


class AppState(Generic[T]):
    __slots__ = ("_service", "_value")

    def __init__(self, service: str) -> None:
        self._service = service
        self._value: T | None = None

    def set(self, value: T) -> None:
        """Called by the lifespan once the objects exist; a second start (tests run a lifespan again) replaces them."""
        self._value = value

    def get(self) -> T:
        value = self._value
        if value is None:
            raise NotStartedError(f"the {self._service}'s state is used before it started (its lifespan has not run)")
        return value

    def peek(self) -> T | None:
        """The objects, or None before the first start (for what may run then, like a metrics scrape)."""
        return self._value
