"""Hub LoRA adapters fetched by the worker rather than by the engine: an adapter registered by its hub id is
downloaded into the worker's Hugging Face cache (the one its engines read) and the engine is told to load the
snapshot's folder, so it never asks the hub itself.

Why not leave it to vLLM, which fetches a hub id it is asked to load: huggingface_hub reads HF_HUB_OFFLINE once, at
import. A base engine started offline during a hub outage (worker/prefetch.py) could then never fetch an adapter
afterwards, the hub back or not, until it restarted; and a fetch inside the engine's API server runs beside the
base's own requests. Here the hub watch's verdict is asked at each fetch: while it finds the hub down, the cache
alone is looked in (an adapter fetched before still loads), and the adapter's error says what is missing.

In a thread of the worker, with worker/hub_download.py's `fetch` (its disk check, its fallback to the cache when the
hub cannot be reached, its errors' sentences): adapters are small (megabytes), and a load that finds its adapter
cached costs one request to the hub, as vLLM's own fetch did. Two engines asking for one adapter at once share its
fetch. A daemon thread of its own, not asyncio's default executor: a download cannot be stopped in the middle of a
file, and the executor would hold a stopping worker until it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..security.models import is_hub_id
from . import hub_download

log = logging.getLogger(__name__)


class AdapterFetchError(Exception):
    """The adapter could not be had, in the sentence its model's `last_error` shows."""


class AdapterFetcher:
    def __init__(self, hub_down: Callable[[], bool] = lambda: False) -> None:
        """`hub_down`: the hub watch's latest verdict (worker/hub_watch.py): down, the cache alone is looked in."""
        self._hub_down = hub_down
        self._running: dict[str, asyncio.Future[str]] = {}

    async def folder(self, weights: str) -> str:
        """What the engine loads for `weights`: a hub id's snapshot folder in the cache, once fetched; a path as it
        is. AdapterFetchError when a hub adapter cannot be had."""
        if not is_hub_id(weights):
            return weights
        running = self._running.get(weights)
        if running is None:
            running = _in_daemon_thread(_fetch, weights, self._hub_down())
            self._running[weights] = running
            running.add_done_callback(lambda done: self._done(weights, done))
        return await asyncio.shield(running)  # one waiter cancelled (its engine gone) leaves the fetch to the rest

    def _done(self, weights: str, done: asyncio.Future[str]) -> None:
        self._running.pop(weights, None)
        if not done.cancelled():
            done.exception()  # retrieved: its waiters may all be gone


def _in_daemon_thread(fetch: Callable[[str, bool], str], repo: str, offline: bool) -> asyncio.Future[str]:
    """`fetch(repo, offline)` in a daemon thread; its outcome in a future of the running loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(outcome: str | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def run() -> None:
        outcome: str | BaseException
        try:
            outcome = fetch(repo, offline)
        except BaseException as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the worker stopped): nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name=f"adapter-fetch {repo}", daemon=True).start()
    return future


def _fetch(repo: str, offline: bool) -> str:
    from huggingface_hub import constants

    events: list[dict[str, Any]] = []
    try:
        folder = hub_download.fetch(repo, None, events.append, offline=offline)
    except Exception as exc:
        message, _ = hub_download.describe(exc, repo, None, constants.ENDPOINT, constants.HF_HUB_CACHE)
        raise AdapterFetchError(message) from exc
    how = " (from the cache alone: the hub does not answer)" if events and events[-1].get("offline") else ""
    log.info("adapter %s fetched into %s%s", repo, folder, how)
    return folder
