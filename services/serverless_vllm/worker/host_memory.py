"""What the manager needs to choose an engine's sleep level (manager/sleep_level.py): this machine's host memory,
and the size of each engine's weights on disk.

A level-1 sleep copies an engine's weights into host memory; a level-2 sleep discards them. The weights' size is
read from the model's files (a local folder, or the Hugging Face cache's copy of a hub id): what vLLM loads, not
what it keeps in memory (a dtype that differs from the files' changes that; quantisation too), which is close
enough to budget host memory with a margin (SLEEP_HOST_MEMORY_FRACTION).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..schemas import HostMemory, ReplicaState
from ..security.models import is_hub_id

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _meminfo(path: str) -> dict[str, int]:
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cgroup(root: str) -> tuple[int, int] | None:
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(root + limit_file).read_text().strip()
            usage = Path(root + usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60 and usage.isdigit():  # "max" or a huge number: no limit
            return int(limit), int(usage)
    return None


def host_memory(root: str = "") -> HostMemory:
    """Total and available memory of this machine (MemTotal, MemAvailable of /proc/meminfo; sysconf where there
    is no /proc), capped by the container's cgroup limit when there is one. `root`: a directory standing for / in
    tests."""
    info = _meminfo(root + "/proc/meminfo")
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if (cgroup := _cgroup(root)) is not None:
        limit, usage = cgroup
        total, available = min(total, limit), min(available, max(0, limit - usage))
    return HostMemory(total_bytes=total, available_bytes=available)


# ------------------------------------------------------------------------------------------------ weights on disk


def _weight_files(folder: Path) -> list[Path]:
    """The files vLLM's default loader reads: the safetensors when there are any, else the PyTorch ones."""
    try:
        files = [f for f in folder.iterdir() if f.is_file()]
    except OSError:
        return []
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    return safetensors or [f for f in files if f.suffix in (".bin", ".pt") and "training_args" not in f.name]


def _hub_cache(env: Mapping[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def _snapshot(model: str, env: Mapping[str, str], revision: str | None) -> Path | None:
    """The cached copy of a hub id: the snapshot its revision's ref names (a branch or tag; `main` without one), the
    snapshot of that name (a commit), else, without a revision, the newest one."""
    repo = _hub_cache(env) / f"models--{model.replace('/', '--')}"
    try:
        ref = (repo / "refs" / (revision or "main")).read_text().strip()
    except OSError:
        ref = revision or ""
    if ref and (repo / "snapshots" / ref).is_dir():
        return repo / "snapshots" / ref
    if revision:
        return None  # not that revision: another one's files would say nothing about it
    try:
        snapshots = [s for s in (repo / "snapshots").iterdir() if s.is_dir()]
    except OSError:
        return None
    return max(snapshots, key=lambda s: s.stat().st_mtime, default=None)


def weights_bytes(model: str, env: Mapping[str, str], revision: str | None = None) -> int | None:
    """The size of a model's weight files: a local folder's, or the cached copy of a hub id (at `revision`) in the
    Hugging Face cache that `env` (the engine's environment) names. None when there are none to measure (not
    downloaded yet, another layout)."""
    folder = _snapshot(model, env, revision) if is_hub_id(model) else Path(model)
    files = _weight_files(folder) if folder is not None else []
    try:
        size = sum(f.stat().st_size for f in files)  # a cache's snapshot holds links to blobs: their size
    except OSError:
        return None
    return size or None


class WeightSizes:
    """Each engine's weights size, measured once it has loaded them (ready or asleep) and kept for its life."""

    def __init__(self) -> None:
        self._sizes: dict[str, int | None] = {}

    def of(self, replica_id: str, state: ReplicaState, measure: Callable[[], int | None]) -> int | None:
        """`measure`: reads the size (weights_bytes), called at most once per engine."""
        if replica_id not in self._sizes and state in (ReplicaState.READY, ReplicaState.SLEEPING):
            self._sizes[replica_id] = measure()
        return self._sizes.get(replica_id)

    def keep(self, replica_ids: Iterable[str]) -> None:
        """Forget the engines that are gone."""
        keep = set(replica_ids)
        self._sizes = {rid: size for rid, size in self._sizes.items() if rid in keep}
