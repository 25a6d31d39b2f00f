"""The standby engine program: an engine process started before it is needed, with vLLM already imported.

Most of an engine's start on a small model is Python importing torch and vLLM (about 10 s of the API server's
start here). A standby pays that while nothing waits for it: it imports the engine module, says so, then blocks
reading one line from stdin. The worker adopts it for a replica by writing that line, a JSON object
`{"argv": [...], "env": {...}}`: the standby takes the environment as the engine's whole environment and runs the
module as `__main__` with those arguments, exactly as `python -m MODULE ARGS` would, in this same process (so
the worker's supervision, the orphan guard, the process group and the log pipe set up at launch all apply).
EOF on stdin (the worker is done with it) ends it.

Run as a script, by path: `python standby_main.py MODULE` (worker/standby.py does), in the environment the
worker gives its engines (site-packages, PYTHONPATH, HF_* and VLLM_* as the operator set them): modules that read
the environment at import (huggingface_hub's constants) then see what a plain start would give them.

No accelerator is touched before adoption: importing torch and vLLM does not initialise CUDA (vLLM detects its
platform through NVML, and relies on this itself to fork its workers), and this program checks it after the
import and refuses to stand by otherwise, so CUDA_VISIBLE_DEVICES given at adoption is the one CUDA sees.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time
import warnings

READY_LINE = "serverless-vllm standby: ready"
ADOPTED_LINE = "serverless-vllm standby: adopted"
EXIT_CUDA_INITIALISED = 3


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return bool(cuda is not None and cuda.is_initialized())


def _retitle(command: list[str]) -> None:
    """The adopted engine shows (ps, /proc/PID/cmdline) the command line of a plain start, not this script's:
    operators and tools that look for engines by their command line find it. setproctitle comes with vLLM."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(" ".join(command))


def main() -> None:
    module = sys.argv[1]
    started = time.monotonic()
    importlib.import_module(module)  # the expensive part
    if _cuda_initialised():
        print(f"serverless-vllm standby: importing {module} initialised CUDA; not standing by", flush=True)
        sys.exit(EXIT_CUDA_INITIALISED)
    print(f"{READY_LINE} ({module} imported in {time.monotonic() - started:.1f} s)", flush=True)
    line = sys.stdin.readline()
    if not line:
        return  # released
    order = json.loads(line)
    # Before the environment changes: setproctitle finds its room in the memory of the original environment.
    _retitle([sys.executable, "-m", module, *order["argv"]])
    os.environ.clear()
    os.environ.update(order["env"])
    # The pipe is not the engine's stdin: vLLM's children must not inherit it (as for a plain start: /dev/null).
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    print(f"{ADOPTED_LINE}: {module} {' '.join(order['argv'])}", flush=True)
    sys.argv = [sys.argv[0], *order["argv"]]
    # runpy warns that the module is already imported (by us, on purpose): the second run only redefines it.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
