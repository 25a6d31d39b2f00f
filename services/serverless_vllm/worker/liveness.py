"""Liveness of a serving engine: a process that is alive but answers nothing (a deadlock, a stuck collective, a
stopped process) holds its requests forever and is never restarted, since only an exit is a crash. Its /health is
probed with a timeout while it serves; after ENGINE_LIVENESS_FAILURES probes in a row failed, the supervisor kills it
and restarts it as after a crash (worker/supervisor.py).

The defaults (a probe every 10 s, 10 s each, 3 in a row) tolerate half a minute of silence: a CPU engine's API server
answers /health between forward passes, and a loaded machine can delay it for seconds, which is no reason to kill it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from .spawn import Launch


class LivenessProbe:
    def __init__(
        self, client: Callable[[], httpx.AsyncClient], interval_s: float, timeout_s: float, failures: int
    ) -> None:
        self._client = client
        self.interval_s = interval_s  # 0: no probes
        self.timeout_s = timeout_s
        self.failures = failures

    async def watch(self, launch: Launch, url: str, stopping: Callable[[], bool]) -> str | None:
        """Return None when the launch exits (or is being stopped), or the reason once it failed `failures` probes
        in a row (the caller kills it)."""
        if not self.interval_s:
            await launch.exited
            return None
        missed = 0
        last = ""
        while True:
            done, _ = await asyncio.wait({launch.exited}, timeout=self.interval_s)
            if done or stopping():
                await launch.exited
                return None
            try:
                response = await self._client().get(url, timeout=self.timeout_s)
                if response.status_code == 200:
                    missed = 0
                    continue
                last = f"HTTP {response.status_code}"
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout_s:g} s"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if launch.exited.done():
                return None
            missed += 1
            if missed >= self.failures:
                return f"engine stopped answering its health probe ({missed} in a row; last: {last})"
