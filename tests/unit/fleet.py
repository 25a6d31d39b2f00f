"""Small fixtures shared by the manager's unit tests: a settable clock and a GPU as NVML describes an H100."""

from __future__ import annotations

from serverless_vllm.schemas import GPUInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gpu(index: int) -> GPUInfo:
    return GPUInfo(index=index, name="NVIDIA H100", uuid=f"GPU-{index}", memory_total_mb=81559, memory_free_mb=81000)


# Nothing listens on the discard port: pushes fail fast and heartbeat replies carry the assignments instead.
NOWHERE = "http://127.0.0.1:9"
