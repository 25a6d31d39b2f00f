"""GPUProbe against a stand-in NVML (two GPUs, no library, no driver) and against the real pynvml here."""

from __future__ import annotations

import logging

import pynvml
import pytest
from serverless_vllm.config import WorkerSettings
from serverless_vllm.worker.gpus import GPUProbe, cpu_slots, total_memory_bytes

from .fake_nvml import FakeGPU, FakeNVML


def two_gpus() -> FakeNVML:
    return FakeNVML(
        gpus=[
            FakeGPU(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_total_mb=81559, memory_used_mb=1024,
                    utilization_pct=37),
            FakeGPU(name="NVIDIA A10G", uuid="GPU-bbbb", memory_total_mb=23028, memory_used_mb=0,
                    utilization_pct=0, utilization_supported=False),
        ]
    )  # fmt: skip


def test_two_gpus_detected_with_their_fields() -> None:
    nvml = two_gpus()
    probe = GPUProbe(nvml=nvml)
    gpus = probe.detect()
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[0].uuid == "GPU-aaaa"
    assert gpus[0].memory_total_mb == 81559 and gpus[0].memory_free_mb == 81559 - 1024
    assert gpus[0].utilization_pct == 37.0
    assert gpus[1].name == "NVIDIA A10G" and gpus[1].memory_free_mb == 23028
    assert gpus[1].utilization_pct == 0.0  # utilisation not supported: 0, not an error
    assert probe.available


def test_sample_reflects_current_usage_and_inits_once() -> None:
    nvml = two_gpus()
    probe = GPUProbe(nvml=nvml)
    probe.detect()
    nvml.gpus[0].memory_used_mb = 70000
    nvml.gpus[0].utilization_pct = 99
    sample = probe.sample()
    assert sample[0].memory_free_mb == 81559 - 70000 and sample[0].utilization_pct == 99.0
    assert nvml.init_calls == 1
    probe.close()
    assert not nvml.initialised


def test_bytes_names_from_old_pynvml_are_decoded() -> None:
    nvml = FakeNVML(gpus=[FakeGPU(name="Tesla T4", uuid="GPU-cccc")])
    nvml.nvmlDeviceGetName = lambda handle: b"Tesla T4"  # type: ignore[method-assign]
    nvml.nvmlDeviceGetUUID = lambda handle: b"GPU-cccc"  # type: ignore[method-assign]
    gpus = GPUProbe(nvml=nvml).detect()
    assert (gpus[0].name, gpus[0].uuid) == ("Tesla T4", "GPU-cccc")


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVMLError_LibraryNotFound),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVMLError_DriverNotLoaded),
        (pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVMLError_NoPermission),
    ],
)
def test_no_driver_means_cpu_only(code: int, exc_type: type, caplog: pytest.LogCaptureFixture) -> None:
    assert type(pynvml.NVMLError(code)) is exc_type  # the double raises what the real library raises
    nvml = FakeNVML(gpus=[FakeGPU()], init_error=code)
    probe = GPUProbe(nvml=nvml)
    with caplog.at_level(logging.INFO, logger="serverless_vllm.worker.gpus"):
        assert probe.detect() == []
        assert probe.sample() == []
        assert probe.sample() == []
    assert not probe.available
    assert exc_type.__name__ in (probe.unavailable_reason or "")
    assert nvml.init_calls == 1  # gave up once, does not retry every heartbeat
    assert sum("CPU-only" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_real_pynvml_without_driver_gives_empty_list() -> None:
    probe = GPUProbe()  # the real pynvml: this machine has no NVIDIA driver
    assert probe.detect() == []
    assert probe.sample() == []
    assert not probe.available
    probe.close()


def test_cpu_slots() -> None:
    assert cpu_slots(WorkerSettings(cpu_slots=3)) == 3
    derived = cpu_slots(WorkerSettings(cpu_slots=0))
    assert derived == max(1, total_memory_bytes() // (1 << 30) // 4)
    assert derived >= 1
