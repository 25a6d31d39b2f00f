"""The GPU worker image (docker/worker-gpu.Dockerfile), built for real from the local Debian base, with no GPU.

Opt-in (``SVLLM_TEST_GPU_IMAGE=1``): it downloads vLLM's CUDA build and its CUDA libraries from PyPI (~4 GB of
wheels, once, into docker/wheelhouse/worker-gpu-cuda/) and builds a ~9 GB image, which does not fit the suite's
time budget. Needs 20 GB free before the download. The official base (vllm/vllm-openai) cannot be pulled here, so
the image is built the way a plain base would be: ``VLLM_PIP_SPEC=vllm==<version>`` installs vLLM into the base's
system Python, through ``docker compose -f compose.yaml -f compose.gpu.yaml build``. The build reaches the
wheels over HTTP from this process (containers here cannot verify PyPI's TLS), so they never enter a build context.

Checked inside the image: vLLM (the pinned version, its torch a CUDA build), the weight loaders and NVML import;
then a worker starts beside a real manager (both from the image), reports no GPU (NVML has no driver here) and
registers as a CPU-only worker, its health check turns healthy, and its log has no traceback.

Afterwards the image and the build cache records the build made are removed (the CPU images and their cache
stay); the wheels are kept for the next run unless fewer than 15 GB are left free. SVLLM_TEST_GPU_IMAGE_KEEP=1 keeps
the image (and its build cache), and a later run with it set checks the kept image instead of building.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_appliance import _wait, harness

log = logging.getLogger("test_gpu_image")

pytestmark = pytest.mark.timeout(3600)

IMAGE = "svllm-test/worker-gpu:dev"
WORKER_TOKEN = "gpu-test-worker-token"
ADMIN_KEY = "gpu-test-admin-key"
KEEP_WHEELS_MIN_FREE_GB = 15

# Run inside the image: what it carries, as one JSON line.
PROBE = """
import importlib.metadata as md, json
import vllm, torch, runai_model_streamer, fastsafetensors, pynvml
try:
    pynvml.nvmlInit()
    nvml = "initialised"
except pynvml.NVMLError as exc:
    nvml = type(exc).__name__
print(json.dumps({
    "vllm": vllm.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "runai_model_streamer": md.version("runai-model-streamer"), "fastsafetensors": md.version("fastsafetensors"),
    "nvidia_ml_py": md.version("nvidia-ml-py"), "nvml": nvml,
}))
"""


def _docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True, timeout=timeout)


def _api(path: str, method: str = "GET") -> Any:
    """The Docker engine's API (build cache records with full ids, which the CLI does not print)."""
    res = subprocess.run(
        ["curl", "-fsS", "-X", method, "--unix-socket", "/var/run/docker.sock", f"http://localhost{path}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout) if res.stdout.strip() else None


def _cache_ids() -> set[str]:
    return {c["ID"] for c in _api("/system/df?type=build-cache").get("BuildCache") or []}


def _serve(directory: Path, host: str) -> tuple[http.server.ThreadingHTTPServer, threading.Thread]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="gpu-wheels", daemon=True)
    thread.start()
    return server, thread


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per wheel is noise
        pass


def _prune_new_build_cache(before: set[str]) -> None:
    """Removes the build cache records made since ``before`` (rmi alone frees nothing: BuildKit's records hold the
    layers). A record goes only after the records made on top of it, hence the passes."""
    for _ in range(20):
        new = _cache_ids() - before
        if not new:
            return
        for cid in new:
            filters = urllib.parse.quote(json.dumps({"id": [cid]}))
            _api(f"/build/prune?all=1&filters={filters}", method="POST")
    log.warning("build cache records left: %s", sorted(_cache_ids() - before))


def _cleanup(cache_before: set[str], wheels: Path) -> None:
    _docker("rmi", "-f", IMAGE, check=False)
    # Only the records this build made: the CPU images' build cache stays for their next (incremental) build.
    _prune_new_build_cache(cache_before)
    free = harness.free_gb(wheels.parent)
    if free < KEEP_WHEELS_MIN_FREE_GB:
        log.info("%.1f GB free: removing the GPU wheelhouse", free)
        for whl in wheels.glob("*.whl"):
            whl.unlink()
        (wheels / ".complete").unlink(missing_ok=True)
    log.info("after cleanup: %.1f GB free", harness.free_gb(wheels.parent))


def _build(wheels: Path) -> None:
    if harness.free_gb() < harness.MIN_FREE_GB_FOR_GPU_BUILD:
        pytest.fail(
            f"the GPU image needs {harness.MIN_FREE_GB_FOR_GPU_BUILD} GB free to build: {harness.free_gb():.1f}"
        )
    gateway = _docker("network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
    server, thread = _serve(wheels, gateway)
    index = f"http://{gateway}:{server.server_address[1]}/"
    env = harness.test_env(
        COMPOSE_PROJECT_NAME="svllm-gpu-test", SVLLM_GPU_BASE_IMAGE=harness.BASE_IMAGE, SVLLM_WORKER_GPU_IMAGE=IMAGE
    )
    args = [
        "build",
        "--build-arg",
        f"VLLM_PIP_SPEC=vllm=={harness.VLLM_GPU_VERSION}",
        "--build-arg",
        f"PIP_EXTRA_ARGS=--no-index --find-links {index} --trusted-host {gateway}",
        "worker",
    ]
    try:
        t0 = time.monotonic()
        harness.compose(*args, files=harness.GPU_COMPOSE_FILES, env=env, timeout=3000)
        size = int(_docker("image", "inspect", IMAGE, "-f", "{{.Size}}").stdout)
        took = time.monotonic() - t0
        log.info("built %s in %.0f s: %.2f GB; %.1f GB free", IMAGE, took, size / 1e9, harness.free_gb())
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def gpu_image() -> Iterator[str]:
    if os.environ.get("SVLLM_TEST_GPU_IMAGE") != "1":
        pytest.skip("opt-in: SVLLM_TEST_GPU_IMAGE=1 (downloads ~4 GB of CUDA wheels, builds a ~9 GB image)")
    keep = os.environ.get("SVLLM_TEST_GPU_IMAGE_KEEP") == "1"
    harness.ensure_docker()
    harness.ensure_compose()
    if keep and harness.image_exists(IMAGE):
        yield IMAGE  # kept by an earlier run: checked again as it is
        return
    harness.ensure_base_image()
    cache_before = _cache_ids()
    wheels = harness.ensure_gpu_wheelhouse()
    try:
        _build(wheels)
        yield IMAGE
    finally:
        if keep:
            log.info("kept %s and its build cache (SVLLM_TEST_GPU_IMAGE_KEEP=1)", IMAGE)
        else:
            _cleanup(cache_before, wheels)


def test_gpu_image_carries_vllm_cuda_loaders_and_nvml(gpu_image: str) -> None:
    res = _docker("run", "--rm", "--entrypoint", "python3", gpu_image, "-c", PROBE, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    log.info("inside %s: %s", gpu_image, found)
    assert found["vllm"] == harness.VLLM_GPU_VERSION
    assert found["torch_cuda"] is not None and not found["torch"].endswith("+cpu"), found
    # No driver in the container: NVML's library is missing, which the worker reads as "no GPU".
    assert found["nvml"] == "NVMLError_LibraryNotFound", found


@pytest.fixture
def network() -> Iterator[str]:
    name = f"svllm-gpu-test-{uuid.uuid4().hex[:8]}"
    _docker("network", "create", name)
    try:
        yield name
    finally:
        _docker("network", "rm", name, check=False)


def _container(name: str, network: str, image: str, *cmd: str, **env: str) -> str:
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    _docker("run", "-d", "--name", name, "--network", network, *env_args, image, *cmd)
    return name


def _exec_json(container: str, url: str, token: str) -> Any:
    script = (
        "import sys, urllib.request; req = urllib.request.Request(sys.argv[1], headers={'Authorization': "
        "'Bearer ' + sys.argv[2]}); print(urllib.request.urlopen(req, timeout=5).read().decode())"
    )
    res = _docker("exec", container, "python3", "-c", script, url, token, check=False, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-1000:])
    return json.loads(res.stdout)


def test_gpu_image_worker_starts_and_reports_no_gpu(gpu_image: str, network: str) -> None:
    auth = {"SVLLM_WORKER_TOKEN": WORKER_TOKEN, "SVLLM_ADMIN_KEY": ADMIN_KEY}
    manager = f"{network}-manager"
    worker = f"{network}-worker"
    started: list[str] = []
    try:
        started.append(_container(manager, network, gpu_image, "manager", MANAGER_DB="/home/svllm/manager.db", **auth))
        started.append(
            _container(
                worker,
                network,
                gpu_image,
                "worker",
                MANAGER_URL=f"http://{manager}:9000",
                WORKER_ID="gpu-image-worker",
                PUBLIC_URL=f"http://{worker}:7000",
                HEARTBEAT_INTERVAL="1",
                **auth,
            )
        )
        health = _wait(
            lambda: (h := _exec_json(worker, "http://127.0.0.1:7000/health", WORKER_TOKEN))["registered"] and h,
            180,
            "the worker to register with the manager",
        )
        assert health["gpus"] == 0 and health["engines"] == 0, health
        body = _exec_json(worker, f"http://{manager}:9000/workers", ADMIN_KEY)
        listed = body["workers"] if isinstance(body, dict) else body
        (info,) = [w for w in listed if w["worker_id"] == "gpu-image-worker"]
        assert info["gpus"] == [] and info["cpu_slots"] >= 1, info
        # The image's own HEALTHCHECK agrees (it polls every 10 s).
        _wait(
            lambda: _docker("inspect", "-f", "{{.State.Health.Status}}", worker).stdout.strip() == "healthy",
            120,
            "the worker container to turn healthy",
        )
        out = _docker("logs", worker)
        logs = out.stdout + out.stderr
        log.info("worker log:\n%s", logs[-3000:])
        assert "NVML unavailable (NVMLError_LibraryNotFound" in logs and "CPU-only" in logs, logs[-3000:]
        assert "Traceback" not in logs and " ERROR " not in logs, logs[-3000:]
    finally:
        for name in started:
            _docker("rm", "-f", name, check=False)


def test_gpu_wheelhouse_stays_out_of_git_and_other_build_contexts() -> None:
    # ~4 GB of wheels: never committed, never sent with the head or CPU worker build.
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "docker/wheelhouse/worker-gpu-cuda/x.whl"], cwd=harness.REPO, check=False
    )
    assert ignored.returncode == 0
    dockerignore = (harness.REPO / ".dockerignore").read_text().splitlines()
    assert "docker/wheelhouse/worker-gpu-cuda" in dockerignore
