"""GPU memory and utilisation per GPU, read from NVML at scrape time (nothing is exported on a CPU-only worker)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..worker.gpus import GPUProbe

_MIB = 1024 * 1024


class GPUCollector(Collector):
    def __init__(self, probe: GPUProbe) -> None:
        self._probe = probe  # the worker's own probe: NVML is initialised once per process and kept open

    def collect(self) -> Iterator[Metric]:
        gpus = self._probe.sample()
        if not gpus:
            return
        labels = ["gpu", "gpu_name"]
        used = GaugeMetricFamily(
            "svllm_gpu_memory_used_bytes", "GPU memory in use (all processes), from NVML.", labels=labels
        )
        total = GaugeMetricFamily("svllm_gpu_memory_total_bytes", "GPU memory in total, from NVML.", labels=labels)
        util = GaugeMetricFamily(
            "svllm_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (NVML utilisation, 0-1).",
            labels=labels,
        )
        for g in gpus:
            values = [str(g.index), g.name]
            used.add_metric(values, float((g.memory_total_mb - g.memory_free_mb) * _MIB))
            total.add_metric(values, float(g.memory_total_mb * _MIB))
            util.add_metric(values, g.utilization_pct / 100.0)
        yield from (used, total, util)
