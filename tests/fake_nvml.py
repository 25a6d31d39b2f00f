"""A test double of the pynvml functions GPUProbe uses.

It stands in for NVIDIA GPUs and a driver, which cannot exist on the machines these tests run on (no GPU, no
driver). It follows pynvml's real interface: same function names and signatures, memory info with
.total/.free/.used in bytes, utilisation with .gpu/.memory in percent, str names and UUIDs (as pynvml returns
them since 11.x), and failures raised as the real pynvml.NVMLError subclasses (built the way pynvml builds them,
``pynvml.NVMLError(code)`` returns the matching subclass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pynvml

# The real exception types, so `except pynvml.NVMLError` and `except nvml.NVMLError` both behave as in production.
NVMLError = pynvml.NVMLError
NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED

_MIB = 1024 * 1024


@dataclass
class FakeGPU:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_total_mb: int = 81559
    memory_used_mb: int = 0
    utilization_pct: int = 0
    utilization_supported: bool = True


@dataclass
class _Memory:
    """Shape of pynvml's c_nvmlMemory_t: bytes."""

    total: int
    free: int
    used: int


@dataclass
class _Utilization:
    """Shape of pynvml's c_nvmlUtilization_t: percent."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class _Handle:
    index: int


@dataclass
class FakeNVML:
    """Module-like object: pass it to GPUProbe(nvml=...) where the real `pynvml` module would go."""

    gpus: list[FakeGPU] = field(default_factory=list)
    init_error: int | None = None  # an NVML_ERROR_* code nvmlInit fails with (no library, no driver ...)
    initialised: bool = False
    init_calls: int = 0

    NVMLError = pynvml.NVMLError

    def _check(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: _Handle) -> FakeGPU:
        self._check()
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[handle.index]

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._check()
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> _Memory:
        gpu = self._gpu(handle)
        total = gpu.memory_total_mb * _MIB
        used = gpu.memory_used_mb * _MIB
        return _Memory(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> _Utilization:
        gpu = self._gpu(handle)
        if not gpu.utilization_supported:
            raise pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return _Utilization(gpu=gpu.utilization_pct, memory=0)
