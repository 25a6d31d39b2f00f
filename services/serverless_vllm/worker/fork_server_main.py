"""The fork server program: one process per worker that has imported vLLM, from which every engine start forks.

Most of an engine's start on a small model is Python importing torch and vLLM (about 10 s of the API server's
start here). This process pays that once, while nothing waits for it, and then forks a child for each engine
start: the child has every module imported already and runs the engine module as `__main__`, exactly as
`python -m MODULE ARGS` would. Any number of starts, at once or one after another, skip the imports, and the
children share the imported modules' memory with this process until they write to it.

Run as a script, by path: `python fork_server_main.py MODULE` (worker/fork_server.py does), in the environment the
worker gives its engines (site-packages, PYTHONPATH, HF_* and VLLM_* as the operator set them): modules that read
the environment at import (huggingface_hub's constants) then see what a plain start would give them. Its stdin is
one end of a SOCK_SEQPACKET socket pair; the worker holds the other. Messages are JSON, one a packet:
- worker -> server: `{"id": N, "argv": [...], "env": {...}}` with one file descriptor (SCM_RIGHTS): the write
  end of the pipe the engine's stdout and stderr go to;
- server -> worker: `{"id": N, "pid": P}` once forked (or `{"id": N, "error": "..."}`), and `{"exit": P,
  "code": C}` when a child exits (C as asyncio's returncode: negative for a signal). Orders that arrive during the
  imports are served after them.
EOF on the socket (the worker is done with it) ends the server; children it forked keep running (each has its own
session, and its orphan guard watches the worker, not this process).

A child: its own session (its process group is the engine's, as for a plain start), stdin /dev/null, stdout and
stderr the pipe it was given, the order's environment as its whole environment, the command line of a plain start
as its title. No accelerator is touched before a fork: importing torch and vLLM does not initialise CUDA (vLLM
detects its platform through NVML, and relies on this itself to fork its workers), and this program checks it
after the import and refuses to serve otherwise, so CUDA_VISIBLE_DEVICES given in an order is the one CUDA sees.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import time
import warnings
from typing import Any

READY_LINE = "serverless-vllm fork server: ready"
FORKED_LINE = "serverless-vllm fork server: forked"
EXIT_CUDA_INITIALISED = 3
_MAX_ORDER = 1 << 20  # an order's JSON (the environment is most of it: a few KiB)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return bool(cuda is not None and cuda.is_initialized())


def _retitle(command: list[str]) -> None:
    """The engine shows (ps, /proc/PID/cmdline) the command line of a plain start, not this script's: operators
    and tools that look for engines by their command line find it. setproctitle comes with vLLM."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(" ".join(command))


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    try:
        control.send(json.dumps(message).encode())
    except OSError:
        pass  # the worker is gone: the EOF ends the loop


def _become_engine(module: str, order: dict[str, Any], out_fd: int, wakeup: tuple[int, int]) -> None:
    """In the forked child: take the engine's session, descriptors, environment and arguments, and run it."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in wakeup:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # replaces the control socket: the engine and its children must not hold it
    os.close(devnull)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    # Before the environment changes: setproctitle finds its room in the memory of the original environment.
    _retitle([sys.executable, "-m", module, *order["argv"]])
    os.environ.clear()
    os.environ.update(order["env"])
    print(f"{FORKED_LINE}: {module} {' '.join(order['argv'])}", flush=True)
    sys.argv = [sys.argv[0], *order["argv"]]
    # runpy warns that the module is already imported (by the server, on purpose): this run only redefines it.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(control, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> None:
    module = sys.argv[1]
    started = time.monotonic()
    importlib.import_module(module)  # the expensive part
    if _cuda_initialised():
        print(f"serverless-vllm fork server: importing {module} initialised CUDA; not serving", flush=True)
        sys.exit(EXIT_CUDA_INITIALISED)
    print(f"{READY_LINE} ({module} imported in {time.monotonic() - started:.1f} s)", flush=True)
    control = socket.socket(fileno=0)
    wakeup = os.pipe()
    os.set_blocking(wakeup[1], False)
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to the wake-up pipe
    while True:
        readable, _, _ = select.select([control.fileno(), wakeup[0]], [], [])
        if wakeup[0] in readable:
            os.read(wakeup[0], 512)
            _reap(control)
        if control.fileno() not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, _MAX_ORDER, 1)
        except InterruptedError:
            continue
        if not data:
            # Released. No interpreter teardown: with vLLM (torch) imported it takes about 2 s, which the worker's
            # own stop would wait for; this process holds nothing to flush or release.
            os._exit(0)
        order = json.loads(data)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            _send(control, {"id": order.get("id"), "error": "an order needs one descriptor (the log pipe)"})
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            _send(control, {"id": order["id"], "error": f"fork: {exc}"})
            continue
        if pid == 0:
            control.detach()  # fd 0: replaced by /dev/null in the child, never closed through this object
            _become_engine(module, order, fds[0], wakeup)
            sys.exit(0)  # the module returned: as `python -m` would end, through the normal exit
        os.close(fds[0])
        _send(control, {"id": order["id"], "pid": pid})


if __name__ == "__main__":
    main()
