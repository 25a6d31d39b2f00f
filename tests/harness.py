"""Real processes for end-to-end tests: `svllm` services started as a user starts them, on loopback."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serverless_vllm.testing.ports import free_port
from serverless_vllm.testing.ports import free_ports as free_ports  # re-exported for the tests

VENV_BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the service may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc!r})")


class Service:
    """One `svllm <command>` process with its log in a file."""

    def __init__(self, name: str, args: list[str], port: int, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.port, self.env = name, args, port, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(VENV_BIN / "svllm"), *self.args]

    def start(self, wait: bool = True, timeout: float = 60) -> Service:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            wait_until(self.healthy, timeout, what=f"{self.name} /health")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log()}")
        return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

    def log(self, lines: int = 60) -> str:
        if not self.log_path.exists():  # never started (an earlier step failed): say so, not FileNotFoundError
            return f"(no log: {self.name} was not started)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9 of the service process alone (its engines must die with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> None:
        self.terminate()
        self.wait_stopped(timeout)

    def terminate(self) -> None:
        """SIGTERM, if it runs (wait_stopped() then waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 30) -> None:
        """Its exit, or SIGKILL of its group after `timeout` seconds."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


GPU_WORKER = Path(__file__).resolve().parent / "gpu_worker.py"


class GPUWorkerDouble(Service):
    """`svllm worker` on a GPU machine's test double: tests/gpu_worker.py (the real worker, NVML from
    tests/fake_nvml.py with one H100)."""

    def command(self) -> list[str]:
        return [sys.executable, str(GPU_WORKER), *self.args]


def engine_pids() -> set[int]:
    """Every vLLM OpenAI server (and its engine core) on this machine, from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"fork_server_main.py" in cmdline:
            continue  # the fork server (worker/fork_server.py): no engine; the engines it forks are retitled
        if b"vllm.entrypoints.openai.api_server" in cmdline or b"VLLM::EngineCore" in cmdline:
            pids.add(int(entry.name))
    return pids


def metric_sum(metrics_text: str, name: str) -> float:
    """The sum of a metric's samples over its labels, from a Prometheus text page (an engine's /metrics)."""
    prefix = f"{name}{{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(prefix))


def engine_metric(worker_url: str, replica_id: str, name: str) -> float:
    """`metric_sum` of one engine's metric, read through its worker (GET /engines/{replica}/metrics)."""
    return metric_sum(httpx.get(f"{worker_url}/engines/{replica_id}/metrics", timeout=10).text, name)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    """Manager, router and workers as separate real processes, as in the plain-HTTP deployment."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = {
            "MANAGER_DB": str(tmp / "manager.db"),
            "SVLLM_STATE_DIR": str(tmp / "state"),
            "HEARTBEAT_TIMEOUT": "5",
            "HEARTBEAT_INTERVAL": "0.5",
            "ENGINE_EXTRA_ARGS": "--enforce-eager",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "CPU_SLOTS": "2",
            # vLLM's "auto" binding, applied only by its multiprocess executor (CPU_ENGINE_UNIPROC=0), pins every CPU
            # engine's compute thread to the same core: a busy engine's spinning threads then starve a second one
            # starting beside it for minutes. The default engines bind nothing (tests/test_engine.py); this keeps
            # a stack that turns the executor back on from that.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            # No fork server: it imports torch and vLLM (~12 s of CPU) at each worker's start, and most stacks here
            # start one engine per worker or none, which saves nothing (a full run with it everywhere took as long,
            # CPU the suite is short of). The modules whose workers start engines again and again (restarts, cold
            # starts, several models) turn it on, as the worker's default is, and test it end to end.
            "ENGINE_FORK_SERVER": "0",
            # Local development settings: no credentials (tests/test_security.py turns them on), and local model
            # paths allowed under the pytest session's temporary root (the tiny model, a missing model).
            "SVLLM_AUTH": "off",
            "SVLLM_MODEL_DIRS": str(tmp.parent),
            **(env or {}),
        }
        self.manager = Service(
            "manager", ["manager", "--host", "127.0.0.1", "--port", str(free_port())], 0, self.env, tmp
        )
        self.manager.port = int(self.manager.args[-1])
        port = free_port()
        self.router = Service(
            "router",
            ["router", "--host", "127.0.0.1", "--port", str(port), "--manager-url", self.manager.url],
            port,
            self.env,
            tmp,
        )
        self.workers: dict[str, Service] = {}

    def add_worker(
        self, worker_id: str, manager_url: str | None = None, wait: bool = True, env: dict[str, str] | None = None
    ) -> Service:
        port = free_port()
        worker = Service(
            worker_id,
            [
                "worker",
                "--worker-id",
                worker_id,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--manager-url",
                manager_url or self.manager.url,
            ],
            port,
            {**self.env, **(env or {})},
            self.tmp,
        )
        self.workers[worker_id] = worker
        return worker.start(wait=wait)

    def start(self, workers: int = 2) -> Stack:
        self.manager.start()
        self.router.start()
        for i in range(1, workers + 1):
            self.add_worker(f"w{i}")
        return self

    def stop(self) -> None:
        # Every worker at once: stopped one by one, the manager would place the replicas of each worker that leaves on
        # the next one to stop (an engine start for nothing), and the stops' drains would add up.
        for worker in self.workers.values():
            worker.terminate()
        for service in [*self.workers.values(), self.router, self.manager]:
            service.stop()

    # ------------------------------------------------------------------ API helpers

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(f"{self.router.url}{path}", timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.router.url}{path}", timeout=60, **kw)

    def model(self, alias: str) -> dict[str, Any]:
        resp = self.get(f"/v1/models/{alias}")
        resp.raise_for_status()
        return resp.json()

    def wait_model(self, alias: str, state: str, timeout: float = 180) -> dict[str, Any]:
        return wait_until(
            lambda: (m := self.model(alias))["state"] == state and m,
            timeout,
            interval=0.5,
            what=f"model {alias} {state}",
        )

    def workers_by_id(self) -> dict[str, dict[str, Any]]:
        return {w["worker_id"]: w for w in self.get("/workers").json()}

    def openai(self, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(
            base_url=f"{self.router.url}/v1",
            api_key=kw.pop("api_key", "unused"),
            max_retries=0,
            timeout=kw.pop("timeout", 120),
            **kw,
        )


def session_for(stack: Stack, alias: str, worker: str) -> str:
    """A session key (`x-session-id`) the router's rendezvous hashing sends to `worker`'s ready replica of
    `alias` (so a request runs there)."""
    import hashlib

    model = stack.model(alias)
    replicas = {r["replica_id"]: r["worker_id"] for r in model["replicas"] if r["state"] == "ready"}
    for i in range(1000):
        key = f"s{i}"
        best = max(replicas, key=lambda rid: hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest())
        if replicas[best] == worker:
            return key
    raise AssertionError(f"no session key maps to {worker}")


# Longer than the official clients' idle expiry (openai's and anthropic's httpx pools drop a connection idle 5 s),
# which is also uvicorn's default keep-alive: a server closing at that moment races the client's next request.
CLIENT_IDLE_EXPIRY_S = 5.0
IDLE_PAST_CLIENTS_S = CLIENT_IDLE_EXPIRY_S + 0.5


class IdleConnection:
    """A keep-alive connection answered once, then reused after an idle spell: the service must have kept it open
    (KEEP_ALIVE_TIMEOUT), not closed it as a client that still trusts it sends its next request."""

    def __init__(self, port: int, path: str = "/health", headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.path, self.headers = path, headers or {}
        self._get()
        self.sock = self.conn.sock
        self.since = time.monotonic()

    def _get(self) -> None:
        self.conn.request("GET", self.path, headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and not resp.will_close, (resp.status, resp.getheaders(), body)

    def reuse_after(self, idle_s: float = IDLE_PAST_CLIENTS_S) -> None:
        """Sleep what is left of `idle_s` since the first answer, then ask again on the same socket (a closed one
        fails: http.client raises RemoteDisconnected or a reset)."""
        time.sleep(max(0.0, self.since + idle_s - time.monotonic()))
        self._get()
        assert self.conn.sock is self.sock
        self.conn.close()


def descendants(pid: int) -> set[int]:
    """All processes below `pid` (engines run in their own sessions but stay children of their worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().split(")")[-1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def engine_processes(worker_pid: int) -> set[int]:
    """A worker's engines and everything below them; not its fork server (worker/fork_server.py), which lives as
    long as the worker, nor the engines' guards."""
    roots = descendants(worker_pid) & engine_pids()
    return roots.union(*(descendants(root) for root in roots))
