"""A worker's own shutdown (SIGTERM: `docker compose stop`, `--scale` down, a service manager): drain, then exit.

uvicorn, told to exit, stops listening and cancels the requests still running after a few seconds, and the worker's
lifespan then stops every engine at once: the streams in flight would be cut. `DrainingServer` runs the agent's
`leave()` first, while the server still answers: the manager takes the worker out of routing and placement and
places its replicas elsewhere, the requests in flight finish (at most DRAIN_TIMEOUT), the engines stop, and only then
does the server shut down as usual. A second SIGTERM or SIGINT exits at once (engines stopped, streams cut).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first exit signal runs `leave` (the worker's drain) before the server stops."""

    def __init__(self, config: uvicorn.Config, leave: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._leave = leave
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or not self.started or self.should_exit or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal, or not serving yet: exit now
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised once the server is down, as uvicorn does
        # A signal handler runs between two bytecodes of whatever the loop was doing: hand the work to the loop.
        self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        log.info("exit signal: draining this worker before it stops (a second signal stops it now)")
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="worker-leave")

    async def _drain(self) -> None:
        try:
            await self._leave()
            log.info("drained: shutting down")
        except Exception:
            log.exception("draining the worker failed: shutting down")
        finally:
            self.should_exit = True
