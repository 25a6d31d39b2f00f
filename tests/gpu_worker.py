"""A test double of a GPU machine for a real worker process: `svllm worker` itself, run with NVML replaced by
tests/fake_nvml.py (one H100, no driver, no CUDA; FAKE_GPU_FOREIGN_MB of its memory in use by another process).
Everything else (HTTP API, registration and heartbeats, engine supervision, sleep and wake) is the worker's own
code. Engines it starts get the GPU command line and environment
(`--enable-sleep-mode`, VLLM_SERVER_DEV_MODE=1); give them a stand-in engine on PYTHONPATH
(tests/sleep_engine), since there is no GPU for vLLM.

    python tests/gpu_worker.py --worker-id g1 --port 7100 --manager-url http://127.0.0.1:9000
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `tests.fake_nvml`

from serverless_vllm import cli
from serverless_vllm.worker import agent
from serverless_vllm.worker.gpus import GPUProbe

from tests.fake_nvml import FakeGPU, FakeNVML


def fake_gpu_probe() -> GPUProbe:
    # FAKE_GPU_FOREIGN_MB: memory that NVML reports in use by processes other than the worker's engines.
    return GPUProbe(nvml=FakeNVML(gpus=[FakeGPU(memory_used_mb=int(os.environ.get("FAKE_GPU_FOREIGN_MB", "0")))]))


if __name__ == "__main__":
    agent.GPUProbe = fake_gpu_probe  # type: ignore[misc, assignment]
    cli.main(["worker", *sys.argv[1:]])
