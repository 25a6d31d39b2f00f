"""GPU discovery and sampling through NVML, and the CPU-only fallback.

A worker without an NVIDIA driver is not an error: it is a CPU-only worker that runs engines on CPU slots.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import WorkerSettings
from ..schemas import GPUInfo

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_GIB = 1024 * _MIB


def _text(value: str | bytes) -> str:
    # Old pynvml releases return bytes, newer ones str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class GPUProbe:
    """Reads the GPUs of this machine through NVML.

    NVML is initialised once, on first use, and kept open for the life of the probe (sampling every heartbeat
    then costs a few microseconds per device). Without a driver every call returns [] and the reason is
    logged once.
    """

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        # The module is injectable so tests can hand in a stand-in for a GPU and driver they cannot have.
        self._nvml = nvml
        self._initialised = False
        self._unavailable_reason: str | None = None

    @property
    def available(self) -> bool:
        return self._ensure_init()

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason

    def _ensure_init(self) -> bool:
        if self._initialised:
            return True
        if self._unavailable_reason is not None:
            return False
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # the package is a dependency, but be a CPU worker rather than crash
                return self._give_up(f"pynvml not importable ({exc})")
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            # LibraryNotFound, DriverNotLoaded, NoPermission, ...: all mean "no usable GPU here".
            return self._give_up(f"{type(exc).__name__}: {exc}")
        self._initialised = True
        return True

    def _give_up(self, reason: str) -> bool:
        self._unavailable_reason = reason
        log.info("NVML unavailable (%s): this is a CPU-only worker", reason)
        return False

    def _read(self) -> list[GPUInfo]:
        if not self._ensure_init():
            return []
        nvml = self._nvml
        assert nvml is not None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            log.warning("NVML device count failed: %s", exc)
            return []
        gpus: list[GPUInfo] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                # A GPU that fell off the bus must not hide the healthy ones.
                log.warning("NVML query of GPU %d failed: %s", index, exc)
                continue
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                util = 0.0  # not supported on some devices (e.g. MIG instances)
            gpus.append(
                GPUInfo(
                    index=index,
                    name=name,
                    uuid=uuid,
                    memory_total_mb=int(mem.total) // _MIB,
                    memory_free_mb=int(mem.free) // _MIB,
                    utilization_pct=util,
                )
            )
        return gpus

    def detect(self) -> list[GPUInfo]:
        """The GPUs of this machine at start-up ([] on a CPU-only worker)."""
        gpus = self._read()
        if gpus:
            log.info("detected %d GPU(s): %s", len(gpus), ", ".join(f"{g.index}:{g.name}" for g in gpus))
        return gpus

    def sample(self) -> list[GPUInfo]:
        """Current memory and utilisation of every GPU, for heartbeats."""
        return self._read()

    def close(self) -> None:
        if self._initialised and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        self._initialised = False


def _cgroup_memory_limit() -> int | None:
    # In a container the cgroup limit, not the host's RAM, is what engines can use.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:  # "max" or a huge number: no limit
            return int(raw)
    return None


def total_memory_bytes() -> int:
    """Physical memory usable by this process: RAM, capped by a cgroup limit when there is one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit else total


def cpu_slots(settings: WorkerSettings) -> int:
    """How many engines a CPU-only worker runs at once: configured, or one per 4 GiB of memory."""
    if settings.cpu_slots > 0:
        return settings.cpu_slots
    return max(1, total_memory_bytes() // _GIB // 4)
