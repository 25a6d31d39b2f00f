"""Standby engines: processes that import vLLM before anyone needs them, each adopted by the next engine start.

An engine's start on a small model is mostly Python imports, paid by the API server and again by the processes
vLLM spawns. standby_main.py is a process that has paid the API server's share already and waits for its orders;
this pool keeps `STANDBY_ENGINES` of them per worker and hands one to each engine start (supervisor.py), which
then skips those imports. The adopted process is the engine: it was launched as any engine is (spawn.py: its own
session, PDEATHSIG, niceness, the orphan guard, the log pipe), so nothing about supervision changes; only its
log lines move from the pool's log to the engine's log file at adoption.

A new standby is launched only while no engine of this worker is starting: its imports would take CPU from the
start it is meant to speed up. A standby that dies by itself is replaced with a growing backoff, and after
MAX_FAILURES in a row the pool gives up (logged): engines then start the plain way, which is always the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from ..aio import stop_tasks
from . import spawn, standby_main
from .engine_log import pump_lines
from .spawn import Launch

log = logging.getLogger(__name__)

PROGRAM = os.path.abspath(standby_main.__file__)
MAX_FAILURES = 5
_CHECK_S = 1.0


class Standby:
    """One standby process, and where its output lines go (the pool's log, then the adopting engine's)."""

    def __init__(self, module: str, number: int) -> None:
        self.module = module
        self.name = f"standby-{number}"
        self.launch: Launch | None = None
        self.ready = False  # vLLM imported: adoption skips the imports
        self.adopted = False
        self._sink: Callable[[str], None] | None = None
        self.lines: deque[str] = deque(maxlen=30)  # before adoption: why a standby died, when it does

    @property
    def alive(self) -> bool:
        return self.launch is not None and self.launch.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.launch.proc.pid if self.launch is not None else None

    def write(self, line: str) -> None:
        if self._sink is not None:
            self._sink(line)
            return
        self.lines.append(line)
        if line.startswith(standby_main.READY_LINE):
            self.ready = True
            log.info("%s (pid %s): %s", self.name, self.pid, line.removeprefix("serverless-vllm standby: "))

    async def pump(self, stream: asyncio.StreamReader) -> None:
        await pump_lines(stream, self.write)

    def adopt(
        self, argv: Sequence[str], env: Mapping[str, str], *, port: int, name: str, sink: Callable[[str], None]
    ) -> Launch:
        """Make this process the engine `name`: `python -m MODULE argv` in environment `env`, logging to `sink`."""
        launch = self.launch
        assert launch is not None and launch.proc.stdin is not None
        order = json.dumps({"argv": list(argv), "env": dict(env)}) + "\n"
        launch.proc.stdin.write(order.encode())
        launch.proc.stdin.close()  # EOF after the order: the standby reads one line
        self.adopted = True
        self._sink = sink
        launch.port = port
        launch.name = name
        return launch

    async def release(self) -> None:
        """End a standby nobody adopted."""
        if self.launch is None:
            return
        if self.launch.proc.stdin is not None:
            self.launch.proc.stdin.close()  # EOF: a standby past its imports exits by itself
        await self.launch.terminate(5)
        await self.launch.cleanup(kill_now=True)


class StandbyPool:
    """Keeps `count` standbys of `module` alive; `take()` hands one over. See the module's docstring."""

    def __init__(
        self,
        count: int,
        environment: Callable[[], dict[str, str]],
        *,
        nice: int,
        busy: Callable[[], bool],
        module: str,
        program: str = PROGRAM,
    ) -> None:
        self._count = count
        self._environment = environment  # an engine's environment without what differs per engine (its GPUs)
        self._nice = nice
        self._busy = busy  # an engine of this worker is starting: no new standby now
        self.module = module
        self._program = program  # another program only to inject faults in tests
        self._standbys: list[Standby] = []
        self._launched = 0
        self._failures = 0
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.adoptions = 0

    @property
    def standbys(self) -> list[Standby]:
        return list(self._standbys)

    def start(self) -> None:
        if self._count > 0 and self._task is None:
            self._task = asyncio.create_task(self._keep(), name="standby-pool")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        self._task = None
        standbys, self._standbys = self._standbys, []
        await asyncio.gather(*(s.release() for s in standbys), return_exceptions=True)

    def take(self, module: str) -> Standby | None:
        """A live standby of `module` for an engine start (imports done or under way), or None: start plainly."""
        for standby in self._standbys:
            if standby.alive and standby.module == module:
                self._standbys.remove(standby)
                self.adoptions += 1
                self._wake.set()  # a replacement, once no engine is starting
                return standby
        return None

    def nudge(self) -> None:
        """An engine's state changed: a replacement may be due."""
        self._wake.set()

    async def _keep(self) -> None:
        while True:
            await self._sweep()
            if any(s.ready for s in self._standbys):
                self._failures = 0  # failures count in a row
            if len(self._standbys) < self._count and not self._busy() and time.monotonic() >= self._retry_at:
                await self._launch()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _CHECK_S)

    async def _sweep(self) -> None:
        for standby in [s for s in self._standbys if not s.alive]:
            self._standbys.remove(standby)
            self._failures += 1
            reason = " | ".join(list(standby.lines)[-3:]) or "no output"
            assert standby.launch is not None
            exit_text = spawn.describe_exit(standby.launch.proc.returncode or 0)
            if self._failures >= MAX_FAILURES:
                log.error("%s %s: %s; standby engines off (engines start plainly)", standby.name, exit_text, reason)
                self._count = 0
            else:
                self._retry_at = time.monotonic() + min(60.0, 2.0**self._failures)
                log.warning("%s %s before adoption: %s", standby.name, exit_text, reason)
            await standby.launch.cleanup(kill_now=True)

    async def _launch(self) -> None:
        self._launched += 1
        standby = Standby(self.module, self._launched)
        try:
            standby.launch = await spawn.launch(
                [sys.executable, self._program, self.module],
                self._environment(),
                port=0,
                nice=self._nice,
                pump=standby.pump,
                name=standby.name,
                stdin_pipe=True,
            )
        except OSError as exc:
            self._failures += 1
            self._retry_at = time.monotonic() + min(60.0, 2.0**self._failures)
            log.warning("cannot launch a standby engine: %s", exc)
            return
        self._standbys.append(standby)
        log.info("%s: launched (pid %d)", standby.name, standby.launch.proc.pid)
