"""Whether this worker's Hugging Face hub answers, watched while the worker caches hub models.

vLLM started online looks its model up on the hub even when every file is in the cache, and when the hub gives no
answer it retries each lookup and fails after about 107 s (hub_download.py). So a model whole in the cache starts
its engines offline (HF_HUB_OFFLINE) while the hub does not answer, and online again once it does
(worker/prefetch.py decides, worker/engine.py applies it at each launch, crash restarts included).

One probe every interval: the request huggingface_hub's `model_info` makes for one of the models cached, through
the same endpoint (HF_ENDPOINT) and proxies. Any answer below 500 is the hub up (a 401 or a 404 is an answer); no
answer (refused, timed out) or a 5xx (a proxy whose upstream is gone, the hub's own outage) is the hub down. An
engine's launch never waits for a probe: the latest verdict stands until the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import quote

import httpx

from ..aio import stop_tasks

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"  # huggingface_hub's, when HF_ENDPOINT is not set
PROBE_TIMEOUT_S = 10.0  # huggingface_hub's own for such a request (HF_HUB_ETAG_TIMEOUT)
# A probe's timeout is at most its interval (one probe at a time), but never below this: a hub that takes a second
# to answer is slow, not down, and judging it down would start engines offline for nothing (a refused connection is
# found at once whatever the timeout).
MIN_PROBE_TIMEOUT_S = 2.0


class HubWatch:
    """`on_change(up)`: called when the verdict changes (the first verdict included). `on_up()`: after each probe
    that finds the hub up (a change or not)."""

    def __init__(
        self,
        endpoint: str,
        interval_s: float,
        *,
        on_change: Callable[[bool], None] = lambda up: None,
        on_up: Callable[[], None] = lambda: None,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._interval_s = interval_s
        self._timeout_s = min(timeout_s, max(interval_s, MIN_PROBE_TIMEOUT_S))
        self._on_change = on_change
        self._on_up = on_up
        self._repo: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.up: bool | None = None  # None: not probed (yet, or not watched)

    @property
    def down(self) -> bool:
        return self.up is False

    @property
    def watching(self) -> bool:
        """Whether probes run (a verdict is coming, or has come and is kept up to date)."""
        return self._task is not None

    def watch(self, repo: str | None) -> None:
        """Probe the hub about `repo` from now on; None: there is nothing to watch for (no hub model cached)."""
        self._repo = repo
        if repo is not None and self._interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="hub-watch")

    async def close(self) -> None:
        await stop_tasks(self._task)
        self._task = None

    async def _run(self) -> None:
        try:
            # A new connection for each probe, as an engine's start opens: a kept one may outlive the hub's outage.
            no_reuse = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=self._timeout_s, limits=no_reuse) as client:
                while (repo := self._repo) is not None:
                    self._set(await self._probe(client, repo))
                    await asyncio.sleep(self._interval_s)
        finally:
            self._task = None  # the last verdict stands: the latest news of the hub

    async def _probe(self, client: httpx.AsyncClient, repo: str) -> tuple[bool, str]:
        url = f"{self.endpoint}/api/models/{quote(repo, safe='/')}"
        try:
            resp = await client.get(url)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        return resp.status_code < 500, f"HTTP {resp.status_code}"

    def _set(self, verdict: tuple[bool, str]) -> None:
        up, why = verdict
        if up is not self.up:
            self.up = up
            if up:
                log.info("the hub %s answers (%s): cached models start online", self.endpoint, why)
            else:
                log.warning(
                    "the hub %s does not answer (%s): models whole in the cache start offline", self.endpoint, why
                )
            self._on_change(up)
        if up:
            self._on_up()
