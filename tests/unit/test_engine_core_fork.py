"""CPU engines fork their EngineCore (worker/engine_core_fork.py, engine_site/sitecustomize.py).

The hook runs as in an engine's processes: a fresh interpreter with the engine's environment. The module it wraps
here is a stand-in for `vllm.platforms.cpu` holding vLLM 0.32's own override (its `CpuPlatform.check_and_update_config`
sets VLLM_WORKER_MULTIPROC_METHOD to spawn); the real platform, and a real EngineCore forked by it, are checked in
tests/test_engine.py (test_the_engine_core_is_forked_from_the_imported_api_server).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serverless_vllm.config import WorkerSettings
from serverless_vllm.worker.engine import engine_environment
from serverless_vllm.worker.engine_core_fork import vllm_cpu_preload

STAND_IN = """
import os


class CpuPlatform:
    @classmethod
    def check_and_update_config(cls, vllm_config):
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # vllm/platforms/cpu.py, vllm-cpu 0.32
"""

PROBE = """
import os
from vllm.platforms.cpu import CpuPlatform
CpuPlatform.check_and_update_config(None)
print(os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"))
"""


def start_method_after_config(tmp_path: Path, asked: str | None) -> str:
    platforms = tmp_path / "vllm" / "platforms"
    platforms.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (platforms / "__init__.py").write_text("")
    (platforms / "cpu.py").write_text(STAND_IN)
    env = engine_environment(WorkerSettings(), has_gpu=False)
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)  # after the engine site, as the operator's own path would be
    env.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
    if asked is not None:
        env["VLLM_WORKER_MULTIPROC_METHOD"] = asked
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_explicit_fork_survives_the_cpu_platform(tmp_path: Path) -> None:
    assert start_method_after_config(tmp_path, "fork") == "fork"
    # Anything else is vLLM's to decide, as without the hook.
    assert start_method_after_config(tmp_path, None) == "spawn"
    assert start_method_after_config(tmp_path, "spawn") == "spawn"


def test_the_preload_is_the_one_vllm_makes_for_its_engine_core(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    torch, vllm = site / "torch", site / "vllm"
    (torch / "lib").mkdir(parents=True)
    (vllm / "libs").mkdir(parents=True)
    # Nothing to preload: nothing changes.
    assert vllm_cpu_preload("", str(torch), str(vllm)) == ""
    assert vllm_cpu_preload("/x.so", None, None) == "/x.so"
    # PyTorch's libgomp, from torch/lib (wheels that vendor it in torch.libs come first), after what is there.
    (torch / "lib" / "libgomp.so.1").write_text("")
    assert vllm_cpu_preload("", str(torch), str(vllm)) == f"{torch}/lib/libgomp.so.1"
    assert vllm_cpu_preload("/x.so", str(torch), str(vllm)) == f"/x.so:{torch}/lib/libgomp.so.1"
    (site / "torch.libs").mkdir()
    (site / "torch.libs" / "libgomp-a34b3233.so.1").write_text("")
    assert vllm_cpu_preload("", str(torch), str(vllm)) == f"{site}/torch.libs/libgomp-a34b3233.so.1"
    # An OpenMP library the operator preloads is left alone.
    assert vllm_cpu_preload("/opt/libiomp5.so", str(torch), str(vllm)) == "/opt/libiomp5.so"
    # A tcmalloc bundled with vLLM goes first, unless one is preloaded already.
    (vllm / "libs" / "libtcmalloc_minimal.so.4").write_text("")
    tcmalloc = f"{vllm}/libs/libtcmalloc_minimal.so.4"
    assert vllm_cpu_preload("", str(torch), str(vllm)) == f"{tcmalloc}:{site}/torch.libs/libgomp-a34b3233.so.1"
    assert vllm_cpu_preload("/t/libtcmalloc.so", None, str(vllm)) == "/t/libtcmalloc.so"


def test_cpu_engines_start_with_the_preload_and_only_with_the_switch_on() -> None:
    on = engine_environment(WorkerSettings(), has_gpu=False)
    assert "libgomp" in on["LD_PRELOAD"] and Path(on["LD_PRELOAD"].split(":")[-1]).is_file()
    off = engine_environment(WorkerSettings(cpu_engine_core_fork=False), has_gpu=False)
    assert off.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD")
    assert engine_environment(WorkerSettings(), has_gpu=True).get("LD_PRELOAD") == os.environ.get("LD_PRELOAD")
