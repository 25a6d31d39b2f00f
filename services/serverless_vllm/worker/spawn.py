"""Launching an engine process and ending it: its own session and process group, PR_SET_PDEATHSIG and niceness,
the orphan guard (guard.py explains why it exists), signals to the whole group, free ports, waiting for exit."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import guard
from .guard import group_members

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GUARD_GRACE_S = 5.0  # between the guard's SIGTERM and SIGKILL of a dead worker's engine
GUARD_SCRIPT = os.path.abspath(guard.__file__)
STREAM_LIMIT = 1 << 20  # vLLM prints long lines (engine config); the 64 KiB default would split them

_PR_SET_PDEATHSIG = 1


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn binds: connections of the previous engine in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(previous: int | None) -> int:
    # A restart keeps its port when it can, so routes to this replica stay valid.
    if previous is not None and port_is_free(previous):
        return previous
    return free_port()


def describe_exit(returncode: int) -> str:
    """'exited with code 3', 'was killed by SIGKILL'."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _engine_preexec(parent_pid: int, nice: int) -> Callable[[], None]:
    # libc is loaded here, in the parent: the forked child must not dlopen before exec.
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the worker died between fork and prctl
            os._exit(1)
        if nice:
            os.nice(nice)  # inherited by EngineCore and every thread it starts

    return preexec


class Process(Protocol):
    """An engine's API server as supervision sees it: a child spawned here (asyncio's Process) or one forked by
    the fork server (fork_server.py)."""

    @property
    def pid(self) -> int:
        """Its process id, and its process group's: it leads a session of its own."""

    @property
    def returncode(self) -> int | None:
        """None while it runs, then as asyncio gives it: the exit code, or minus the signal that ended it."""


async def wait_exit(proc: Process) -> int:
    # Not proc.wait(): since Python 3.11.5/3.12 it also waits for stdout to close, which EngineCore keeps open
    # after the API server died. returncode is set as soon as the child watcher reaps the process.
    while True:
        if proc.returncode is not None:
            return proc.returncode
        await asyncio.sleep(0.1)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Launch:
    """One run of the engine process, with the helpers that live and die with it."""

    proc: Process
    guard: asyncio.subprocess.Process | None
    guard_fd: int | None  # write end of the guard's pipe; closing it makes the guard sweep the group
    exited: asyncio.Task[int]
    reader: asyncio.Task[None]
    port: int
    name: str  # the replica's, for log messages
    rpc_dir: str | None = None  # its vLLM's ZMQ socket files (VLLM_RPC_BASE_PATH): removed with its group

    @property
    def pgid(self) -> int:
        return self.proc.pid  # session leader: its pid is the group id

    def close_guard_pipe(self, kill_now: bool = False) -> None:
        if self.guard_fd is not None:
            if kill_now:
                with contextlib.suppress(OSError):
                    os.write(self.guard_fd, b"K")
            with contextlib.suppress(OSError):
                os.close(self.guard_fd)
            self.guard_fd = None

    async def terminate(self, timeout: float) -> None:
        """SIGTERM the group, wait for the API server and its children, then SIGKILL the rest."""
        pgid = self.pgid
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited.done() and not group_members(pgid):
                break
            await asyncio.sleep(0.1)
        else:
            log.warning("engine %s: still running %.0fs after SIGTERM, killing", self.name, timeout)
            signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), 10)

    async def cleanup(self, kill_now: bool = False) -> None:
        """After the API server exited: let the guard sweep the group, then drain the log pipe."""
        self.close_guard_pipe(kill_now)
        if self.guard is not None:
            try:
                await asyncio.wait_for(self.guard.wait(), GUARD_GRACE_S + 5)
            except TimeoutError:
                signal_group(self.pgid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    self.guard.kill()
                await self.guard.wait()
        elif group_members(self.pgid):
            signal_group(self.pgid, signal.SIGKILL)
        # The log pipe closes when the last holder in the group is gone.
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), 5)
        except TimeoutError:
            self.reader.cancel()
        if self.rpc_dir is not None:
            guard.remove_dir(self.rpc_dir)  # the guard's sweep removed it already, unless there was no guard


async def launch(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    port: int,
    nice: int,
    pump: Callable[[asyncio.StreamReader], Coroutine[Any, Any, None]],
    name: str,
    stdin: int | None = None,
    rpc_dir: str | None = None,
) -> Launch:
    """Start `cmd` in a session of its own, with its guard; `pump` reads its stdout and stderr. `stdin`: a
    descriptor the child gets as its stdin (the fork server's control socket, fork_server.py), else /dev/null.
    `rpc_dir`: a directory of the launch's own, removed once its group is gone (Launch.rpc_dir)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_engine_preexec(os.getpid(), nice),
        limit=STREAM_LIMIT,
    )
    assert proc.stdout is not None
    return await supervise(proc, proc.stdout, port=port, pump=pump, name=name, rpc_dir=rpc_dir)


async def supervise(
    proc: Process,
    stdout: asyncio.StreamReader,
    *,
    port: int,
    pump: Callable[[asyncio.StreamReader], Coroutine[Any, Any, None]],
    name: str,
    rpc_dir: str | None = None,
) -> Launch:
    """A Launch of `proc`, a session leader already running: its guard started, its output pumped."""
    read_fd, write_fd = os.pipe()  # non-inheritable: only the guard gets the read end, as its stdin
    guard_proc: asyncio.subprocess.Process | None = None
    try:
        guard_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", GUARD_SCRIPT, str(proc.pid), str(GUARD_GRACE_S),
            *([rpc_dir] if rpc_dir else []),
            stdin=read_fd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # it cannot join the engine's group (another session) and needn't
        )  # fmt: skip
    except OSError as exc:
        # Still supervised (PDEATHSIG + stop()), just not proof against kill -9 of the worker.
        log.error("engine %s: cannot start its guard: %s", name, exc)
        os.close(write_fd)
        write_fd = -1
    finally:
        os.close(read_fd)
    return Launch(
        proc=proc,
        guard=guard_proc,
        guard_fd=write_fd if write_fd >= 0 else None,
        exited=asyncio.create_task(wait_exit(proc)),
        reader=asyncio.create_task(pump(stdout)),
        port=port,
        name=name,
        rpc_dir=rpc_dir,
    )
