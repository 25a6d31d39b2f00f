"""The orphan guard (worker/guard.py), run for real as the worker runs it (`python -I -S guard.py PGID GRACE_S`, stdin
the read end of a pipe), against throwaway process groups of `sleep` processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverless_vllm.worker.guard import group_members
from serverless_vllm.worker.spawn import GUARD_SCRIPT

_IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN);"
    " time.sleep(60)"
)


class Procs:
    """Every process a test starts, killed (group and all) at the end whatever happened."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.started.append(proc)
        return proc

    def group(self, *, ignore_sigterm: bool = False) -> subprocess.Popen[bytes]:
        """The leader of a new process group (its pid is the group id). The engine's group is also a session of its
        own, but that is not what the guard relies on; and only in the test's session can more of our children join."""
        if ignore_sigterm:
            leader = self.start([sys.executable, "-c", _IGNORES_SIGTERM], process_group=0)
            wait_ignoring(leader.pid, signal.SIGTERM)
            return leader
        return self.start(["sleep", "60"], process_group=0)

    def join(self, pgid: int) -> subprocess.Popen[bytes]:
        """Another member of the group `pgid`."""
        return self.start(["sleep", "60"], process_group=pgid)

    def guard(self, pgid: int, grace_s: float, rpc_dir: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """The guard of group `pgid`, ready (its signals ignored, so past its start-up), and the pipe's write end."""
        read_fd, write_fd = os.pipe()
        try:
            guard = self.start(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    GUARD_SCRIPT,
                    str(pgid),
                    str(grace_s),
                    *([str(rpc_dir)] if rpc_dir else []),
                ],
                stdin=read_fd,
                start_new_session=True,
                cwd="/",
            )
        finally:
            os.close(read_fd)
        wait_ignoring(guard.pid, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        return guard, write_fd

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


def ignored_signals(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}
    return set()


def wait_ignoring(pid: int, *signals: signal.Signals, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not {int(s) for s in signals} <= ignored_signals(pid):
        assert time.monotonic() < deadline, f"process {pid} never ignored {signals}"
        time.sleep(0.01)


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


# --------------------------------------------------------------------------- the guard


def test_worker_gone_terminates_the_group(procs: Procs) -> None:
    """EOF (the worker died): SIGTERM to every member of the group; members that obey need no SIGKILL."""
    leader = procs.group()
    member = procs.join(leader.pid)
    guard, write_fd = procs.guard(leader.pid, grace_s=30)
    time.sleep(0.3)
    assert leader.poll() is None and member.poll() is None  # nothing happens while the pipe is open
    started = time.monotonic()
    os.close(write_fd)
    assert leader.wait(10) == -signal.SIGTERM
    assert member.wait(10) == -signal.SIGTERM
    assert guard.wait(10) == 0
    assert time.monotonic() - started < 10  # not after the 30 s grace
    assert group_members(leader.pid) == []


def test_worker_gone_kills_what_outlives_the_grace(procs: Procs) -> None:
    """A member that ignores SIGTERM (as EngineCore outlives its API server) is SIGKILLed after the grace."""
    leader = procs.group(ignore_sigterm=True)
    member = procs.join(leader.pid)
    guard, write_fd = procs.guard(leader.pid, grace_s=1.0)
    started = time.monotonic()
    os.close(write_fd)
    assert member.wait(10) == -signal.SIGTERM
    assert leader.wait(10) == -signal.SIGKILL
    assert time.monotonic() - started >= 1.0  # the grace was given
    assert guard.wait(10) == 0


def test_k_before_eof_kills_at_once(procs: Procs) -> None:
    """The worker sweeps a crashed engine: "K" then EOF is SIGKILL now, no SIGTERM and no grace."""
    leader = procs.group()
    member = procs.join(leader.pid)
    guard, write_fd = procs.guard(leader.pid, grace_s=60)
    started = time.monotonic()
    os.write(write_fd, b"K")
    os.close(write_fd)
    assert leader.wait(10) == -signal.SIGKILL
    assert member.wait(10) == -signal.SIGKILL
    assert guard.wait(10) == 0
    assert time.monotonic() - started < 10


def test_guard_outlives_the_signals_that_stop_a_worker(procs: Procs) -> None:
    """SIGTERM, SIGINT and SIGHUP (to it or to its group) leave the guard waiting; only EOF moves it."""
    leader = procs.group()
    guard, write_fd = procs.guard(leader.pid, grace_s=30)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(guard.pid, sig)
        os.killpg(guard.pid, sig)  # it leads a session of its own: its pid is its group's id
    time.sleep(0.5)
    assert guard.poll() is None, guard.returncode
    assert leader.poll() is None
    os.close(write_fd)
    assert leader.wait(10) == -signal.SIGTERM  # still on duty
    assert guard.wait(10) == 0


def test_worker_gone_removes_the_rpc_dir_once_the_group_is_gone(procs: Procs, tmp_path: Path) -> None:
    """The engine's RPC directory (vLLM's ZMQ socket files, VLLM_RPC_BASE_PATH): removed after the sweep, not while
    a member of the group may still use it (here one that outlives the SIGTERM until the grace ends)."""
    rpc = tmp_path / "svllm-rpc-x"
    rpc.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(rpc / "0b6a4c1e-ipc"))  # as zmq's ipc:// binds: a socket file that outlives a killed owner
    listener.close()
    (rpc / "other").write_text("x")
    leader = procs.group(ignore_sigterm=True)
    guard, write_fd = procs.guard(leader.pid, grace_s=1.5, rpc_dir=rpc)
    time.sleep(0.3)
    assert sorted(p.name for p in rpc.iterdir()) == ["0b6a4c1e-ipc", "other"]  # nothing while the pipe is open
    os.close(write_fd)
    time.sleep(0.5)
    assert leader.poll() is None and rpc.is_dir()  # in the grace: the group is still there, so is the directory
    assert leader.wait(10) == -signal.SIGKILL
    assert guard.wait(10) == 0
    assert not rpc.exists()


def test_guard_of_an_empty_group_just_exits(procs: Procs) -> None:
    leader = procs.group()
    guard, write_fd = procs.guard(leader.pid, grace_s=30)
    leader.kill()
    leader.wait()
    os.close(write_fd)
    assert guard.wait(10) == 0


# --------------------------------------------------------------------------- group_members


def test_group_members_are_the_live_members_of_that_group_only(procs: Procs) -> None:
    leader = procs.group()
    member = procs.join(leader.pid)
    outsider = procs.group()  # a group of its own
    assert sorted(group_members(leader.pid)) == sorted([leader.pid, member.pid])
    assert group_members(outsider.pid) == [outsider.pid]
    member.kill()  # not reaped yet: a zombie, which is not a live member
    deadline = time.monotonic() + 10
    while state(member.pid) != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert group_members(leader.pid) == [leader.pid]
    leader.kill()
    leader.wait()
    member.wait()
    assert group_members(leader.pid) == []
