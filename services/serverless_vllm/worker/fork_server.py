"""Engines forked from a process that has imported vLLM already (the fork server, fork_server_main.py).

An engine's start on a small model is mostly Python imports, paid by the API server and again by the processes
vLLM spawns. The fork server pays the API server's share once per worker; every engine start then asks it for a
child (supervisor.py), which has the imports done and runs the engine. Several starts at once each skip them.

A forked engine is supervised as a spawned one is (spawn.py): its own session and process group, the orphan
guard, the log pipe (the worker's, handed over with the order), the same Launch. What differs is the exit
status: the engine is the fork server's child, not the worker's, so the server reports it (ForkedProcess). Should
the server die first, the kernel still says when each child ends (a pidfd), with the status lost.

The server is launched only while no engine of this worker is starting and no request was served for a moment:
its imports take seconds of CPU. One that dies is replaced with a growing backoff, and after MAX_FAILURES in a row
the worker gives up (logged): engines then start the plain way, which is always the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from ..aio import stop_tasks
from . import fork_server_main, spawn
from .engine_log import pump_lines
from .spawn import STREAM_LIMIT, Launch

log = logging.getLogger(__name__)

PROGRAM = os.path.abspath(fork_server_main.__file__)
MAX_FAILURES = 5
UNKNOWN_EXIT = 255  # the status of a child whose fork server died before it: the kernel gave it to init
_CHECK_S = 1.0
# What the server's imports read once and keep (huggingface_hub's offline switch, which vLLM and transformers ask):
# an engine whose value differs, one started offline while the hub is down (prefetch.py), is started plainly.
READ_AT_IMPORT = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_MAX_REPORT = 1 << 16

Pump = Callable[[asyncio.StreamReader], Coroutine[Any, Any, None]]


class ForkedProcess:
    """An engine the fork server forked: `returncode` from the server's report, or from a pidfd once it is gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = None

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def orphaned(self) -> None:
        """The fork server is gone: no report will come; the kernel says when this process ends."""
        if self.returncode is not None or self._pidfd is not None:
            return
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.exited(UNKNOWN_EXIT)
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self.exited, UNKNOWN_EXIT)


class ForkServer:
    """The worker's fork server: launched, watched, replaced; `fork()` starts an engine from it."""

    def __init__(
        self,
        enabled: bool,
        environment: Callable[[], dict[str, str]],
        *,
        nice: int,
        busy: Callable[[], bool],
        module: str,
        program: str = PROGRAM,
    ) -> None:
        self._enabled = enabled
        self._environment = environment  # an engine's environment without what differs per engine (its GPUs)
        self._nice = nice
        self._busy = busy  # no launch now: an engine of this worker is starting, or requests are being served
        self.module = module
        self._program = program  # another program only to inject faults in tests
        self.launch: Launch | None = None  # the server process
        self._launched_env: dict[str, str] = {}  # its environment
        self.ready = False  # its imports are done
        self.lines: deque[str] = deque(maxlen=30)  # its own output: why it died, when it does
        self._control: socket.socket | None = None
        self._reports: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[ForkedProcess | None]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._orders = 0
        self.launches = 0
        self._failures = 0
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.forks = 0

    @property
    def alive(self) -> bool:
        return self.launch is not None and self.launch.proc.returncode is None and self._control is not None

    @property
    def pid(self) -> int | None:
        return self.launch.proc.pid if self.launch is not None else None

    def start(self) -> None:
        if self._enabled and self._task is None:
            self._task = asyncio.create_task(self._keep(), name="fork-server")

    def nudge(self) -> None:
        """An engine's state changed: a launch may be due."""
        self._wake.set()

    async def stop(self) -> None:
        """End the server (engines it forked keep running: each is stopped by its own supervisor)."""
        await stop_tasks(self._task)
        self._task = None
        await self._end()

    async def fork(
        self, module: str, argv: Sequence[str], env: Mapping[str, str], *, port: int, name: str, pump: Pump,
        timeout: float, stop: asyncio.Event | None = None, rpc_dir: str | None = None,
    ) -> Launch | None:  # fmt: skip
        """Start `python -m module argv` in environment `env` as a child of the server, or None: start plainly
        (or not at all, if `stop` was set meanwhile). An order given during the server's imports is served after
        them (still sooner than a plain start); `stop` ends that wait at once. `rpc_dir`: as spawn.launch's."""
        control = self._control
        if module != self.module or control is None or not self.alive:
            return None
        if any(env.get(var) != self._launched_env.get(var) for var in READ_AT_IMPORT):
            log.info("engine %s starts plainly: its %s differs from the fork server's", name, "/".join(READ_AT_IMPORT))
            return None
        read_fd, write_fd = os.pipe()
        self._orders += 1
        order_id = self._orders
        reply: asyncio.Future[ForkedProcess | None] = asyncio.get_running_loop().create_future()
        self._pending[order_id] = reply
        order = {"id": order_id, "argv": list(argv), "env": dict(env)}
        try:
            socket.send_fds(control, [json.dumps(order).encode()], [write_fd])
        except OSError as exc:
            self._pending.pop(order_id, None)
            os.close(read_fd)
            log.warning("fork server: cannot send an order (%s); engine %s starts plainly", exc, name)
            return None
        finally:
            os.close(write_fd)  # the server holds its copy now; the child gets it as stdout and stderr
        try:
            child = await self._reply(reply, timeout, stop, name)
        except asyncio.CancelledError:
            os.close(read_fd)
            raise
        if child is None:
            os.close(read_fd)
            return None
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
        self.forks += 1
        return await spawn.supervise(child, reader, port=port, pump=pump, name=name, rpc_dir=rpc_dir)

    async def _reply(
        self, reply: asyncio.Future[ForkedProcess | None], timeout: float, stop: asyncio.Event | None, name: str
    ) -> ForkedProcess | None:
        """The forked child, or None: no fork (the server's error, or its end), none within `timeout`, or `stop`
        set first. A child forked after its order was given up on is killed at its report (_report)."""
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        waits = [f for f in (reply, stopped) if f is not None]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if reply.done() and not reply.cancelled() and (child := reply.result()) is not None:
                _kill(child.pid)  # forked in the same moment: nobody would supervise it
            raise
        finally:
            if stopped is not None:
                stopped.cancel()
            if not reply.done():
                reply.cancel()
        if reply.cancelled():
            if stop is None or not stop.is_set():
                log.warning("fork server: no fork within %.0fs; engine %s starts plainly", timeout, name)
            return None
        return reply.result()

    # ------------------------------------------------------------------ the server process

    def _write(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith(fork_server_main.READY_LINE):
            self.ready = True
            log.info("fork server (pid %s): %s", self.pid, line.removeprefix("serverless-vllm fork server: "))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        await pump_lines(stream, self._write)

    async def _keep(self) -> None:
        while True:
            if self.launch is not None and not self.alive:
                await self._lost()
            if self.ready:
                self._failures = 0  # failures count in a row
            if self._enabled and self.launch is None and not self._busy() and time.monotonic() >= self._retry_at:
                await self._launch()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _CHECK_S)

    async def _lost(self) -> None:
        assert self.launch is not None
        self._failures += 1
        reason = " | ".join(list(self.lines)[-3:]) or "no output"
        code = self.launch.proc.returncode
        exit_text = spawn.describe_exit(code) if code is not None else "closed its socket"
        if self._failures >= MAX_FAILURES:
            log.error("fork server %s: %s; fork server off (engines start plainly)", exit_text, reason)
            self._enabled = False
        else:
            self._retry_at = time.monotonic() + min(60.0, 2.0**self._failures)
            log.warning("fork server %s: %s", exit_text, reason)
        await self._end()

    async def _launch(self) -> None:
        self.launches += 1
        self.ready = False
        self.lines.clear()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._launched_env = self._environment()
        try:
            self.launch = await spawn.launch(
                [sys.executable, self._program, self.module],
                self._launched_env,
                port=0,
                nice=self._nice,
                pump=self._pump,
                name=f"fork-server-{self.launches}",
                stdin=theirs.fileno(),
            )
        except OSError as exc:
            ours.close()
            self._failures += 1
            self._retry_at = time.monotonic() + min(60.0, 2.0**self._failures)
            log.warning("cannot launch the fork server: %s", exc)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self._reports = asyncio.create_task(self._read_reports(ours), name="fork-server-reports")
        log.info("fork server: launched (pid %d)", self.launch.proc.pid)

    async def _end(self) -> None:
        """Close the control socket (the server exits at its EOF) and wait for the server to go."""
        if self._control is not None:
            self._control.close()
            self._control = None
        await stop_tasks(self._reports)
        self._reports = None
        self._orphan_all()  # the reports task does it as it ends, but not if it was cancelled before it first ran
        launch, self.launch = self.launch, None
        self.ready = False
        if launch is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(launch.exited), 5)
            if not launch.exited.done():
                await launch.terminate(2)
            await launch.cleanup(kill_now=True)

    # ------------------------------------------------------------------ its reports

    async def _read_reports(self, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(control, _MAX_REPORT):
                self._report(json.loads(data))
        except OSError as exc:
            log.warning("fork server: its socket failed: %s", exc)
        finally:
            if self._control is control:
                self._control = None  # not alive: _keep notices and replaces it
                self._wake.set()
            self._orphan_all()

    def _report(self, message: dict[str, Any]) -> None:
        if "exit" in message:
            child = self._children.pop(int(message["exit"]), None)
            if child is not None:
                child.exited(int(message["code"]))
            return
        reply = self._pending.pop(int(message["id"]), None)
        if "error" in message:
            log.warning("fork server: %s", message["error"])
            if reply is not None and not reply.done():
                reply.set_result(None)
            return
        child = ForkedProcess(int(message["pid"]))
        self._children[child.pid] = child
        if reply is None or reply.done():
            _kill(child.pid)  # its engine start gave up waiting (started plainly, or stopped): nobody supervises it
            return
        reply.set_result(child)

    def _orphan_all(self) -> None:
        for reply in self._pending.values():
            if not reply.done():
                reply.set_result(None)
        self._pending.clear()
        for child in self._children.values():
            child.orphaned()
        self._children.clear()


def _kill(pid: int) -> None:
    """SIGKILL a forked child and its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)  # perhaps before its setsid(): not only its group
    spawn.signal_group(pid, signal.SIGKILL)
