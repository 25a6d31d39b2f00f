"""scripts/gpu_check.py, the check of the worker's GPU path on a real GPU (README, "Checked on a real GPU"), kept
working here on the NVML double: its stack part (manager, router, a GPU worker, a model placed on the GPU, a
completion, the worker's GPU metrics) must pass with `--fake-gpu`, so the script does not rot between the sessions
that have a GPU to run it on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_the_gpu_check_passes_on_the_nvml_double(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--fake-gpu", "--out", str(out)], capture_output=True, text=True, timeout=240
    )
    result = json.loads(out.read_text())
    assert done.returncode == 0, result
    stack = result["stack"]
    assert stack["ok"] and stack["engine_cuda_visible_devices"] == "0" and stack["completion"] == "awake"
    assert [r["gpus"] for r in stack["replicas"]] == [[0]]
    assert "probe" not in result  # no GPU here: the NVML and nvidia-smi checks run on a real one only
