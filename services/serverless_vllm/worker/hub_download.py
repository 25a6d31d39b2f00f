"""One hub model downloaded into this machine's Hugging Face cache: the program the worker's prefetcher runs in a
child process (worker/prefetch.py), one model at a time.

    python -m serverless_vllm.worker.hub_download REPO [--revision REV]

It lists the repository's files at the revision, checks that what is missing fits on the cache's disk, and downloads
them with huggingface_hub's `snapshot_download` into the cache the engines read: the child has the worker's
environment (HF_HOME or HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) and so do the engines, so an engine
started later finds the files where it looks. With HF_HUB_OFFLINE set it only checks that the model is cached.

What it tells its parent, one JSON object a line on stdout:

    {"event": "listed", "total": N}           the size of the files to have, once listed
    {"event": "progress", "bytes": N}         every PROGRESS_S while downloading: what the cache holds so far
    {"event": "done", "bytes": N}             ("offline": true when the hub could not be reached and the cache
                                              already held the model: its engines must start offline, see below)
    {"event": "failed", "error": "...", "fault": "source"}   source, worker or other (schemas.CacheFault)

A hub that does not answer (no network, a proxy or mirror down; or a 5xx, as the hub watch judges it) with the model
already whole in the cache is not a failure: vLLM itself, started online, retries the hub for each file it looks up
and then gives up (about 107 s with the connection refused, then the engine fails, though every file is on disk).
The cache is checked as offline, and the worker starts that model's engines with HF_HUB_OFFLINE (worker/prefetch.py,
worker/engine.py).

A child process rather than a thread: it is killed when the model is deleted or the worker stops (a thread cannot be
stopped in the middle of a file), and its downloads never compete with the worker's event loop for the GIL.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..schemas import CacheFault

PROGRESS_S = 1.0

# The weight formats vLLM does not read when a repository has safetensors (its default loader prefers them), and the
# folders of other runtimes' copies: a repository often holds the same weights three or four times over.
_OTHER_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.ot"]
_NEVER = ["*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.gguf", "original/*", "onnx/*", "openvino/*", "coreml/*"]

Emit = Callable[[dict[str, Any]], None]


class Failure(Exception):
    """A download that cannot succeed, with the sentence the model's `last_error` shows."""

    def __init__(self, message: str, fault: CacheFault) -> None:
        super().__init__(message)
        self.fault = fault


def ignore_patterns(files: Iterable[str]) -> list[str]:
    """What not to download of a repository holding `files`: other runtimes' copies always, and the other weight
    formats when there are safetensors (vLLM's default loader reads those, else the PyTorch files)."""
    safetensors = any(f.endswith(".safetensors") for f in files)
    return _NEVER + (_OTHER_WEIGHTS if safetensors else [])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def _label(repo: str, revision: str | None) -> str:
    return f"{repo!r}" + (f" at revision {revision!r}" if revision else "")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def in_cache(storage: Path, commit: str, files: Iterable[str]) -> int:
    """Bytes of a model's download that are in the cache: its files in the snapshot, and the partial blobs being
    written (huggingface_hub writes each file to blobs/<etag>.<random>.incomplete, then renames it)."""
    done = 0
    snapshot = storage / "snapshots" / commit
    for name in files:
        try:
            done += (snapshot / name).stat().st_size  # a link to its blob: the blob's size
        except OSError:
            pass
    try:
        with os.scandir(storage / "blobs") as blobs:
            for blob in blobs:
                if blob.name.endswith(".incomplete"):
                    try:
                        done += blob.stat().st_size
                    except OSError:
                        pass  # renamed meanwhile: counted in the snapshot next time
    except OSError:
        pass
    return done


def cached(repo: str, revision: str | None, why_offline: str) -> tuple[int, str]:
    """The size and folder of the model's snapshot in the cache, found without the hub; Failure when it is not there
    whole."""
    from huggingface_hub import snapshot_download

    label = _label(repo, revision)
    try:
        folder = snapshot_download(repo, revision=revision, local_files_only=True, ignore_patterns=_NEVER)
    except Exception as exc:
        raise Failure(
            f"{label} is not in this worker's Hugging Face cache, and {why_offline} "
            f"({type(exc).__name__}): its engines could not download it either",
            CacheFault.WORKER,
        ) from exc
    present = [f for f in Path(folder).rglob("*") if f.is_file()]
    if not any(f.suffix in (".safetensors", ".bin", ".pt", ".pth") for f in present):  # only a config fetched
        raise Failure(
            f"{label} is in this worker's Hugging Face cache without its weights, and {why_offline}: "
            "its engines could not download them either",
            CacheFault.WORKER,
        )
    return sum(f.stat().st_size for f in present), folder


def unreachable(exc: BaseException) -> bool:
    """The hub is down: no answer, or a 5xx (the hub's own outage, a proxy or mirror whose upstream is gone), as
    the hub watch judges it (hub_watch.py); as opposed to an answer that refuses (a 4xx)."""
    name = type(exc).__name__
    if "Connect" in name or "Timeout" in name:
        return True
    response = getattr(exc, "response", None)  # huggingface_hub's HfHubHTTPError carries the answer
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and status >= 500


def describe(exc: BaseException, repo: str, revision: str | None, endpoint: str, cache: str) -> tuple[str, CacheFault]:
    """What went wrong, in one sentence, and whose fault it is."""
    from huggingface_hub import errors

    label = _label(repo, revision)
    if isinstance(exc, Failure):
        return str(exc), exc.fault
    if isinstance(exc, errors.GatedRepoError):
        return f"{label} is gated on {endpoint}: accept its terms there, set HF_TOKEN on the workers", CacheFault.SOURCE
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"repository {repo!r} not found on {endpoint} (a private one needs HF_TOKEN on the workers)",
            CacheFault.SOURCE,
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {revision!r} not found in repository {repo!r} on {endpoint}", CacheFault.SOURCE
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            refused = f"access to {label} refused by {endpoint} (HTTP {status}): check HF_TOKEN on the workers"
            return refused, CacheFault.SOURCE
        return f"{endpoint} answered HTTP {status} for {label}: {str(exc).splitlines()[0][:200]}", CacheFault.OTHER
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on this worker's disk for {label} (Hugging Face cache {cache}): {exc}", CacheFault.WORKER
    name = type(exc).__name__
    if unreachable(exc):
        return f"cannot reach {endpoint} to download {label}: {name}: {exc}", CacheFault.OTHER
    return f"download of {label} failed: {name}: {exc}", CacheFault.OTHER


def fetch(repo: str, revision: str | None, emit: Emit, offline: bool = False) -> str:
    """Download the model into the cache (or, offline, check that it is there), telling `emit` how it goes; its
    snapshot's folder. `offline`: the caller knows the hub does not answer (the cache alone is looked in)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    if constants.HF_HUB_OFFLINE or offline:
        why = "HF_HUB_OFFLINE is set there" if constants.HF_HUB_OFFLINE else "the hub does not answer"
        size, folder = cached(repo, revision, why)
        emit({"event": "listed", "total": size})
        emit({"event": "done", "bytes": size, **({"offline": True} if offline else {})})
        return folder
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:
        if not unreachable(exc):
            raise
        try:
            size, folder = cached(repo, revision, "the hub cannot be reached")
        except Failure:
            raise exc from None  # nothing to start from: the hub's error is the one to tell
        emit({"event": "listed", "total": size})
        emit({"event": "done", "bytes": size, "offline": True})
        return folder
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    ignore = ignore_patterns(sizes)
    files = [f for f in sizes if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore)]  # as snapshot_download
    total = sum(sizes[f] for f in files)
    emit({"event": "listed", "total": total})
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    commit = info.sha or ""
    missing = total - in_cache(storage, commit, files)
    free = shutil.disk_usage(_existing(storage)).free
    if missing > free:
        raise Failure(
            f"not enough disk space on this worker for {_label(repo, revision)}: {_gib(missing)} to download, "
            f"{_gib(free)} free for the Hugging Face cache {constants.HF_HUB_CACHE}",
            CacheFault.WORKER,
        )
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(PROGRESS_S):
            emit({"event": "progress", "bytes": min(total, in_cache(storage, commit, files))})

    reporter = threading.Thread(target=report, name="progress", daemon=True)
    reporter.start()
    try:
        folder = snapshot_download(repo, revision=revision, ignore_patterns=ignore)
    finally:
        stop.set()
        reporter.join()
    emit({"event": "done", "bytes": total})
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub_download", description="download one hub model into the HF cache")
    parser.add_argument("repo")
    parser.add_argument("--revision")
    args = parser.parse_args(argv)
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    try:
        fetch(args.repo, args.revision, emit)
    except Exception as exc:
        from huggingface_hub import constants

        message, fault = describe(exc, args.repo, args.revision, constants.ENDPOINT, constants.HF_HUB_CACHE)
        emit({"event": "failed", "error": message, "fault": fault.value})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
