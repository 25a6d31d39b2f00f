"""The manager's LoRA adapter series: loads, load time, unloads and refused loads per adapter; adapters loaded per
replica (manager/adapters.py counts them). Requests per adapter are the router's, by model, as for any model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .common import TextFamily

if TYPE_CHECKING:
    from ..manager.adapters import AdapterStats


def adapter_text(
    stats: AdapterStats, per_replica: Iterable[tuple[str, str, int]], registered: Iterable[str] = ()
) -> str:
    """`per_replica`: (base alias, replica id, adapters its engine reports loaded). The counters of every
    `registered` adapter exist from 0, as the cold-start counter of every model does: increase() sees the first
    load, and a dashboard shows an adapter before anything happened to it."""
    zeros = dict.fromkeys(registered, 0)
    families = []
    for name, doc, counts in (
        ("svllm_adapter_loads_total", "Adapter loads engines reported done.", stats.loads),
        ("svllm_adapter_load_seconds_total", "Seconds from asking for a load to its report.", stats.load_seconds),
        ("svllm_adapter_unloads_total", "Adapters engines reported unloaded.", stats.unloads),
        ("svllm_adapter_load_failures_total", "Adapter loads engines refused.", stats.failures),
    ):
        family = TextFamily(name, "counter", doc, ["model"])
        for alias, value in sorted({**zeros, **counts}.items()):
            family.add((alias,), value)
        families.append(family)
    loaded = TextFamily(
        "svllm_replica_adapters", "gauge", "LoRA adapters a replica's engine holds.", ["model", "replica"]
    )
    for base, replica, n in per_replica:
        loaded.add((base, replica), n)
    families.append(loaded)
    return "".join(f.text() for f in families)
