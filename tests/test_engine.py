"""EngineProcess: command/env, supervision logic, and the real vLLM CPU engine on the tiny model.

At most one vLLM engine runs at a time: the tests that start their own engine run before the module's shared
engine is created (pytest runs them in file order) and stop theirs before they return.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from serverless_vllm.config import WorkerSettings
from serverless_vllm.schemas import Assignment, EngineArgs, LoadFormat, ReplicaState
from serverless_vllm.worker import supervisor as supervisor_mod
from serverless_vllm.worker.engine import ENGINE_MODULE, EngineError, EngineProcess, engine_environment
from serverless_vllm.worker.engine_log import CORE_GONE_REASON
from serverless_vllm.worker.fork_server import ForkServer
from serverless_vllm.worker.guard import group_members

START_TIMEOUT = 240.0


# --------------------------------------------------------------------------- helpers


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reparented zombie may wait for a lazy init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from /proc (no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def niceness(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[16])  # field 19 of proc(5)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


async def eventually(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if predicate() or time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
    return predicate()


async def wait_until_dead(pids: list[int], timeout: float) -> list[int]:
    await eventually(lambda: not any(alive(p) for p in pids), timeout, 0.2)
    return [p for p in pids if alive(p)]


def wait_until_dead_sync(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def make_settings(tmp: Path, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "worker_id": "test-worker",
        "log_dir": str(tmp / "logs"),
        "engine_extra_args": ["--enforce-eager"],  # halves start-up on CPU
        "engine_start_timeout_s": START_TIMEOUT,
    }
    values.update(overrides)
    return WorkerSettings.model_validate(values)


def make_assignment(
    model: str | Path, replica_id: str = "r-tiny-1", alias: str = "tiny", **engine: object
) -> Assignment:
    return Assignment(replica_id=replica_id, alias=alias, model_name=str(model), engine=EngineArgs(**engine))


# --------------------------------------------------------------------------- command and environment


def test_cpu_command_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = make_settings(tmp_path, cpu_kvcache_gib=3, engine_extra_args=["--enforce-eager"])
    eng = EngineProcess(make_assignment("/m", max_model_len=512, extra_args=["--seed", "7"]), settings, has_gpu=False)
    cmd = eng.command(4321)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[3:] == [
        "--model", "/m", "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "4321",
        "--dtype", "auto", "--tensor-parallel-size", "1", "--max-model-len", "512",
        "--enable-scale-out",  # the task's flags
        "--distributed-executor-backend", "uni",  # CPU_ENGINE_UNIPROC: the model worker inside EngineCore
        "--disable-uvicorn-access-log",  # vLLM's access log off by default
        "--enforce-eager", "--seed", "7",
    ]  # fmt: skip
    env = eng.environment()
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # vLLM's CPU platform refuses 'uni' without it
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"  # CPU_ENGINE_CORE_FORK: EngineCore forked, not spawned
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"  # passed through, not forced
    assert "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert not eng.sleep_supported
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    assert eng.environment()["VLLM_CPU_KVCACHE_SPACE"] == "5"  # the operator's value wins
    # CPU_ENGINE_UNIPROC=0, or an executor the operator chose: vLLM's own default.
    for off in (
        EngineProcess(make_assignment("/m"), make_settings(tmp_path, cpu_engine_uniproc=False), has_gpu=False),
        EngineProcess(
            make_assignment("/m", extra_args=["--distributed-executor-backend", "mp"]), settings, has_gpu=False
        ),
    ):
        assert off.command(1).count("--distributed-executor-backend") == len(off.assignment.engine.extra_args) // 2
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in off.environment()
        assert "VLLM_WORKER_MULTIPROC_METHOD" not in off.environment()  # several processes: vLLM's spawn
    # CPU_ENGINE_CORE_FORK=0: vLLM's spawn; an operator's own start method wins over the switch.
    unforked = EngineProcess(make_assignment("/m"), make_settings(tmp_path, cpu_engine_core_fork=False), has_gpu=False)
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in unforked.environment()
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    assert eng.environment()["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    # ENGINE_ACCESS_LOG=1: vLLM keeps its own line per request.
    with_access_log = make_settings(tmp_path, engine_access_log=True)
    assert "--disable-uvicorn-access-log" not in EngineProcess(
        make_assignment("/m"), with_access_log, has_gpu=False
    ).command(1)
    monkeypatch.setenv("ENGINE_ACCESS_LOG", "yes")
    assert WorkerSettings.from_env().engine_access_log


def test_command_parses_with_the_installed_vllm(tmp_path: Path) -> None:
    """The flags we add exist in this vLLM (its own argument parser; no engine is started), and the operator's
    ENGINE_EXTRA_ARGS come last: a --no-disable-uvicorn-access-log there wins over our default."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for extra, access_log_off in (([], True), (["--no-disable-uvicorn-access-log"], False)):
        eng = EngineProcess(make_assignment("/m"), make_settings(tmp_path, engine_extra_args=extra), has_gpu=False)
        cmd = eng.command(4321)
        assert cmd[2] == "vllm.entrypoints.openai.api_server"
        assert parser.parse_args(cmd[3:]).disable_uvicorn_access_log is access_log_off


@pytest.mark.parametrize("has_gpu", [False, True])
def test_every_load_format_parses_with_the_installed_vllm(tmp_path: Path, has_gpu: bool) -> None:
    """Each `load_format` a registration may choose is one of this vLLM's loaders, reaches its parser as such, and
    can reload weights from disk (a wake from sleep level 2 asks that of it: reload_weights needs get_all_weights)."""
    pytest.importorskip("vllm")
    from typing import get_args

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.model_executor import model_loader
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for load_format in LoadFormat:
        assert load_format.value in get_args(model_loader.LoadFormats)
        assert hasattr(model_loader._LOAD_FORMAT_TO_MODEL_LOADER[load_format.value], "get_all_weights")
        eng = EngineProcess(make_assignment("/m", load_format=load_format), make_settings(tmp_path), has_gpu=has_gpu)
        args = parser.parse_args(eng.command(4321)[3:])
        assert args.load_format == load_format.value
        assert eng.command(4321).count("--load-format") == (load_format is not LoadFormat.AUTO)


def test_gpu_command_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    a = make_assignment("org/model", gpu_memory_utilization=0.8, tensor_parallel_size=2).model_copy(
        update={"gpus": [2, 3]}
    )
    eng = EngineProcess(a, make_settings(tmp_path, engine_extra_args=[]), has_gpu=True)
    cmd = eng.command(5000)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--enable-sleep-mode" in cmd and "--max-model-len" not in cmd
    assert "--distributed-executor-backend" not in cmd  # GPUs keep vLLM's executor (CPU_ENGINE_UNIPROC is CPU's)
    env = eng.environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # /sleep and /wake_up exist only in dev mode
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert "HF_HUB_OFFLINE" not in env
    assert eng.sleep_supported


async def test_sleep_refused_on_cpu(tmp_path: Path) -> None:
    eng = EngineProcess(make_assignment("/m"), make_settings(tmp_path), has_gpu=False)
    with pytest.raises(EngineError, match="GPU"):
        await eng.sleep()
    with pytest.raises(EngineError, match="GPU"):
        await eng.wake()


# --------------------------------------------------------------------------- supervision, with a stand-in server

# Stands in for the vLLM server where only supervision is under test: answers /health (mode "serve"), exits at
# once with an error ("die"), never answers ("mute"), or, like vLLM, also runs a child process in its group that
# ignores SIGTERM and its parent's death ("tree").
_STAND_IN = textwrap.dedent(
    """
    import http.server, subprocess, sys, time
    port, mode = int(sys.argv[1]), sys.argv[2]
    print("stand-in engine starting", flush=True)
    if mode == "die":
        print("ValueError: model weights are broken", flush=True)
        sys.exit(3)
    if mode == "mute":
        time.sleep(3600)
    if mode == "tree":
        subprocess.Popen([sys.executable, "-c", "import ctypes, signal, time; "
                          "ctypes.CDLL(None).prctl(15, b'stubborn-child', 0, 0, 0); "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


class StandInEngine(EngineProcess):
    mode = "serve"

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-c", _STAND_IN, str(port), self.mode]


async def test_a_launch_waits_for_the_hub_verdict_and_a_stop_ends_the_wait(tmp_path: Path) -> None:
    """Before each launch the engine awaits `hub_judged` (worker/prefetch.py: during a hub outage, until its model's
    check says whether it is whole in the cache), so `hub_offline` is asked only then: launched earlier, an engine of
    a cached model would start online and fail after about 107 s. A stop during the wait launches nothing."""
    released, asked = asyncio.Event(), asyncio.Event()
    verdict = {"offline": False}

    async def judged() -> None:
        asked.set()
        await released.wait()

    eng = StandInEngine(
        make_assignment(tmp_path),
        make_settings(tmp_path),
        has_gpu=False,
        hub_offline=lambda: verdict["offline"],
        hub_judged=judged,
    )
    await eng.start()
    try:
        assert await eventually(asked.is_set, 5)
        await asyncio.sleep(0.5)
        assert eng.pid is None and eng.state is ReplicaState.STARTING  # nothing launched while the check runs
        verdict["offline"] = True  # the check found the model whole in the cache, the hub down
        released.set()
        assert await eng.wait_ready(20), eng.log_tail()
        environ = await asyncio.to_thread(Path(f"/proc/{eng.pid}/environ").read_bytes)
        assert b"HF_HUB_OFFLINE=1" in environ.split(b"\0")
    finally:
        await eng.stop()

    waiting = StandInEngine(
        make_assignment(tmp_path, replica_id="r-tiny-2"), make_settings(tmp_path), has_gpu=False, hub_judged=judged
    )
    released.clear()
    asked.clear()
    await waiting.start()
    assert await eventually(asked.is_set, 5)
    began = time.monotonic()
    await waiting.stop()
    # Not after its stop timeout (20 s) and the supervisor's grace: the wait ended with the stop.
    assert time.monotonic() - began < 15 and waiting.pid is None and waiting.restarts == 0


async def test_crash_restarts_with_backoff_then_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_mod, "BACKOFF_MAX_S", 0.2)  # the real 1, 2, 4 ... s backoff, capped for speed
    changes: list[ReplicaState] = []

    def record() -> None:
        changes.append(eng.state)

    eng = StandInEngine(make_assignment(tmp_path), make_settings(tmp_path), has_gpu=False, on_change=record)
    await eng.start()
    try:
        assert await eng.wait_ready(20)
        first_port = eng.port
        for crash in range(1, 5):
            pid = eng.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert await eventually(lambda: eng.state != ReplicaState.READY, 5)  # seen within 0.1 s
            assert await eng.wait_ready(20), eng.log_tail()
            assert eng.restarts == crash
            assert eng.port == first_port  # a restart keeps its port
            assert eng.error is None  # cleared once ready again
            assert eng.status().log_tail  # the tail rides along after a crash
        pid = eng.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the fifth crash within 10 minutes
        assert await eventually(lambda: eng.state == ReplicaState.FAILED, 20)
        assert eng.error is not None and "5 crashes" in eng.error and "SIGKILL" in eng.error
        assert eng.restarts == 4
        assert changes.count(ReplicaState.READY) == 5
    finally:
        await eng.stop()


async def test_exit_before_ready_fails_without_retry(tmp_path: Path) -> None:
    eng = StandInEngine(make_assignment(tmp_path), make_settings(tmp_path), has_gpu=False)
    eng.mode = "die"
    await eng.start()
    try:
        assert not await eng.wait_ready(20)
        assert eng.state == ReplicaState.FAILED
        assert eng.error == "engine exited with code 3 before becoming ready: ValueError: model weights are broken"
        assert eng.restarts == 0
        status = eng.status()
        assert status.state == ReplicaState.FAILED and "stand-in engine starting" in status.log_tail
        assert "ValueError: model weights are broken" in eng.log_path.read_text()
    finally:
        await eng.stop()


async def test_a_model_path_missing_on_the_worker_fails_at_once_and_says_so(tmp_path: Path) -> None:
    """vLLM takes a path it cannot find for a hub id: "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'", seconds into its start. The worker says what is wrong, and starts nothing."""
    missing = tmp_path / "no-such-model"
    eng = StandInEngine(make_assignment(missing), make_settings(tmp_path), has_gpu=False)
    await eng.start()
    try:
        assert not await eng.wait_ready(5)
        assert eng.state == ReplicaState.FAILED and eng.pid is None and eng.restarts == 0
        assert eng.error == f"model path {missing} does not exist on worker {eng.settings.worker_id}"
    finally:
        await eng.stop()


async def test_start_timeout_fails_and_kills(tmp_path: Path) -> None:
    eng = StandInEngine(make_assignment(tmp_path), make_settings(tmp_path, engine_start_timeout_s=1.0), has_gpu=False)
    eng.mode = "mute"
    await eng.start()
    try:
        assert await eventually(lambda: eng.pid is not None, 5)  # launched by the engine's task
        pid = eng.pid
        assert pid is not None
        assert not await eng.wait_ready(20)
        assert eng.state == ReplicaState.FAILED
        assert eng.error is not None and "not ready within" in eng.error
        assert await wait_until_dead([pid], 5) == []
    finally:
        await eng.stop()


async def test_engine_runs_at_the_configured_niceness(tmp_path: Path) -> None:
    """ENGINE_NICE lowers the engine's priority below the worker's (so the relay is not starved by it)."""
    eng = StandInEngine(make_assignment(tmp_path), make_settings(tmp_path, engine_nice=7), has_gpu=False)
    eng.mode = "mute"
    await eng.start()
    try:
        assert await eventually(lambda: eng.pid is not None, 5)  # launched by the engine's task
        pid = eng.pid
        assert pid is not None
        assert niceness(pid) == min(19, os.nice(0) + 7)
    finally:
        await eng.stop()


# --------------------------------------------------------------------------- the real engine: orphans
# (A real engine that fails to start is tested once, end to end: tests/test_e2e_http.py.)


# A worker in miniature: starts one engine, reports its processes, then dies as the test says.
_WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from serverless_vllm.config import WorkerSettings
    from serverless_vllm.schemas import Assignment, EngineArgs
    from serverless_vllm.worker.engine import EngineProcess

    kind, model, out, how = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]

    class StandIn(EngineProcess):
        def command(self, port):
            return [sys.executable, "-c", Path(model).read_text(), str(port), "tree"]

    async def main():
        settings = WorkerSettings(log_dir=str(out.parent / "logs"), engine_extra_args=["--enforce-eager"])
        assignment = Assignment(replica_id="r-orphan", alias="tiny", model_name=model, engine=EngineArgs())
        eng = (StandIn if kind == "stand-in" else EngineProcess)(assignment, settings, has_gpu=False)
        await eng.start()
        ok = await eng.wait_ready(240)
        out.write_text(json.dumps({"ok": ok, "pgid": eng.pid, "guard": eng._runs.launch.guard.pid}))
        if how == "exit":  # the worker ends without stopping its engine, once the test has looked
            while not out.with_suffix(".go").exists():
                await asyncio.sleep(0.1)
            return
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def run_worker_and_kill(kind: str, model: str, tmp_path: Path, how: str, expect: list[str]) -> None:
    out = tmp_path / "engine.json"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER_SCRIPT)
    # The worker's temporary directory, where its engines' RPC directories are made: short, as /tmp is (vLLM's
    # socket paths in it must fit a Unix socket's 107 bytes; tmp_path's would not).
    tmp = Path(tempfile.mkdtemp(prefix="svllm-t-"))
    worker = subprocess.Popen(
        [sys.executable, str(script), kind, model, str(out), how],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    recorded: list[int] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not out.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        recorded = descendants(worker.pid)  # engine, its children, the guard
        assert out.exists(), "the worker script never reported its engine"
        info = json.loads(out.read_text())
        assert info["ok"], info
        names = [comm(p) for p in recorded]  # /proc comm is cut at 15 characters
        for name in expect:
            assert any(n.startswith(name) for n in names), names
        assert info["guard"] in recorded
        assert len(group_members(info["pgid"])) >= len(expect)
        (rpc_dir,) = tmp.glob("svllm-rpc-*")
        if kind == "vllm":  # vLLM's own ZMQ sockets are in it (a stand-in makes none)
            assert any(stat.S_ISSOCK(p.stat().st_mode) for p in rpc_dir.iterdir()), sorted(rpc_dir.iterdir())

        if how == "exit":
            out.with_suffix(".go").touch()
            assert worker.wait(30) == 0
        else:
            worker.send_signal(getattr(signal, how))
            worker.wait(10)
        # The guard's grace (5 s) plus a shutdown: all gone well within 20 s.
        left = wait_until_dead_sync(recorded, 20)
        assert left == [], [(p, comm(p)) for p in left]
        assert group_members(info["pgid"]) == []
        assert not rpc_dir.exists()  # removed by the guard after its sweep, however the worker ended
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in recorded:  # never leave an engine behind for the next test, whatever failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
def test_no_orphans_when_worker_dies_stand_in(tmp_path: Path, how: str) -> None:
    # The stand-in's child ignores SIGTERM and outlives its parent, like EngineCore: only the guard's
    # escalation to SIGKILL of the whole group ends it.
    source = tmp_path / "stand_in.py"
    source.write_text(_STAND_IN)
    run_worker_and_kill("stand-in", str(source), tmp_path, how, expect=["python", "stubborn-child"])


def test_no_orphans_when_worker_is_killed_real_engine(tiny_model: Path, tmp_path: Path) -> None:
    # The model worker runs inside EngineCore on CPU (CPU_ENGINE_UNIPROC): no VLLM::Worker process.
    run_worker_and_kill("vllm", str(tiny_model), tmp_path, "SIGKILL", expect=["VLLM::EngineCor"])


# --------------------------------------------------------------------------- the real engine: one shared


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EngineProcess]:
    """The real engine, forked from the fork server (worker/fork_server.py) as a worker's engines are by default."""
    settings = make_settings(tmp_path_factory.mktemp("engine"))
    eng: EngineProcess | None = None
    server = ForkServer(
        True,
        lambda: engine_environment(settings, has_gpu=False),
        nice=settings.engine_nice,
        busy=lambda: eng is not None and eng.state is ReplicaState.STARTING,
        module=ENGINE_MODULE,
    )
    server.start()
    try:
        assert await eventually(lambda: server.ready, START_TIMEOUT), list(server.lines)
        eng = EngineProcess(make_assignment(tiny_model), settings, has_gpu=False, fork_server=server)
        started = time.monotonic()
        await eng.start()
        try:
            assert await eng.wait_ready(START_TIMEOUT), eng.log_tail(40)
            print(f"\nvLLM CPU engine ready in {time.monotonic() - started:.1f}s (forked by the fork server)")
            assert eng.pid is not None and _parent(eng.pid) == server.pid and server.forks == 1
            yield eng
        finally:
            await eng.stop()
    finally:
        await server.stop()


pytestmark_shared = pytest.mark.asyncio(loop_scope="module")


@pytestmark_shared
async def test_engine_ready_and_serves(engine: EngineProcess) -> None:
    assert engine.state == ReplicaState.READY
    assert engine.port is not None and engine.base_url == f"http://127.0.0.1:{engine.port}"
    assert engine.pid is not None and engine.restarts == 0 and engine.error is None
    status = engine.status()
    assert status.state == ReplicaState.READY and status.pid == engine.pid and status.log_tail == []
    async with httpx.AsyncClient(base_url=engine.base_url, timeout=60) as client:
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
        )
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["model"] == "tiny" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] > 0
        completion = await client.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 5})
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 5
    assert engine.log_path.is_file() and "Starting vLLM" in engine.log_path.read_text()
    assert any("/health" in line for line in engine.log_tail(200))


def _proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _parent(pid: int) -> int:
    return int(_proc(pid, "stat").decode().rsplit(")", 1)[1].split()[1])


@pytestmark_shared
async def test_the_engine_core_is_forked_from_the_imported_api_server(engine: EngineProcess) -> None:
    """CPU_ENGINE_CORE_FORK (worker/engine_core_fork.py): vLLM's CPU platform would spawn the EngineCore, a new
    program that imports torch and vLLM again. A forked EngineCore shares with its parent the memory neither has
    written since (the imported modules): Shared_Dirty in its smaps_rollup, about 200 MB here. A spawned one, a
    program of its own, shares no anonymous memory with anyone: 0 kB (seen with CPU_ENGINE_CORE_FORK=0)."""
    api = engine.pid
    assert api is not None
    cores = [p for p in group_members(api) if _proc(p, "cmdline").startswith(b"VLLM::EngineCore")]
    assert len(cores) == 1, [_proc(p, "cmdline") for p in group_members(api)]
    core = cores[0]
    assert _parent(core) == api
    rollup = dict(line.split(b":", 1) for line in _proc(core, "smaps_rollup").splitlines()[1:])
    shared_kib = int(rollup[b"Shared_Dirty"].split()[0])
    assert shared_kib > 50_000, rollup
    # The libraries a spawned EngineCore would have had preloaded, there since the API server started: PyTorch's
    # libgomp, which the EngineCore's OpenMP thread binding uses.
    preload = [lib for lib in engine.environment()["LD_PRELOAD"].split(":") if "torch" in lib and "libgomp" in lib]
    assert len(preload) == 1 and preload[0].encode() in _proc(core, "maps"), engine.environment()["LD_PRELOAD"]


@pytestmark_shared
async def test_the_engine_pins_no_thread_to_a_core(engine: EngineProcess) -> None:
    """vLLM's CPU thread binding (VLLM_CPU_OMP_THREADS_BIND, `auto` unless set; unset here, as in the appliance) is
    applied by its multiprocess executor alone: with the model worker inside EngineCore (CPU_ENGINE_UNIPROC) every
    thread of the engine may run on every CPU its worker may, so the engines of one worker spread over its cores.
    With the multiprocess executor, `auto` pinned each engine's compute thread (`VLLM::Worker`) to the first CPU
    (2026-12-03, two CPUs: allowed 0 only, one left for the scheduler): every engine of a worker on one core."""
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine.environment()
    api = engine.pid
    assert api is not None
    allowed = os.sched_getaffinity(0)
    pinned = {
        (pid, _proc(pid, "cmdline")[:40], tid): cpus
        for pid in group_members(api)
        for tid in _threads(pid)
        if (cpus := _affinity(tid)) is not None and cpus != allowed
    }
    assert len(group_members(api)) >= 2 and pinned == {}, pinned


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def _affinity(tid: int) -> set[int] | None:
    try:
        return os.sched_getaffinity(tid)
    except OSError:  # the thread ended meanwhile
        return None


def rpc_sockets_of(engine: EngineProcess) -> Path:
    """The running launch's directory for vLLM's ZMQ sockets (VLLM_RPC_BASE_PATH), which vLLM's ipc sockets are in."""
    launch = engine._runs.launch
    assert launch is not None and launch.rpc_dir is not None
    rpc_dir = Path(launch.rpc_dir)
    assert rpc_dir.parent == Path(tempfile.gettempdir()) and rpc_dir.name.startswith("svllm-rpc-")
    sockets = [p for p in rpc_dir.iterdir() if stat.S_ISSOCK(p.stat().st_mode)]
    assert sockets, sorted(rpc_dir.iterdir())  # vLLM took the variable: its sockets are here, not in /tmp itself
    return rpc_dir


@pytestmark_shared
async def test_engine_restarts_after_its_engine_core_is_killed(engine: EngineProcess) -> None:
    """kill -9 of the EngineCore (as the kernel's out-of-memory killer does; the API server's kill -9 is
    tests/test_faults.py's): its API server exits, the worker says why and restarts it."""
    pid = engine.pid
    assert pid is not None
    before = group_members(pid)
    assert len(before) >= 2  # API server, EngineCore with the model worker in it (+ resource tracker)
    (core,) = [p for p in before if _proc(p, "cmdline").startswith(b"VLLM::EngineCore")]
    # The restart forks from the fork server again.
    server = engine.fork_server
    assert server is not None and server.ready
    rpc_dir = rpc_sockets_of(engine)
    os.kill(core, signal.SIGKILL)
    # Out of READY once the API server has exited, the rest swept by the guard, then one restart after 1 s. The
    # reason is the engine core's death, not vLLM's EngineDeadError that points "above" for it.
    assert await eventually(lambda: engine.state != ReplicaState.READY and engine.error is not None, 30)
    assert engine.error is not None and engine.error.endswith("while serving: " + CORE_GONE_REASON), engine.error
    assert await engine.wait_ready(START_TIMEOUT), engine.log_tail(40)
    assert engine.restarts == 1
    assert engine.pid != pid and engine.pid is not None and _parent(engine.pid) == server.pid and server.forks == 2
    assert await wait_until_dead(before, 5) == []
    # The killed run's ZMQ socket files went with its group; the new run has a directory of its own.
    assert not rpc_dir.exists() and rpc_sockets_of(engine) != rpc_dir
    status = engine.status()
    assert status.restarts == 1 and status.log_tail  # a recent crash: the tail rides along
    async with httpx.AsyncClient(base_url=engine.base_url, timeout=60) as client:
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text


@pytestmark_shared
async def test_engine_stop_leaves_no_process(engine: EngineProcess) -> None:
    pgid = engine.pid
    assert pgid is not None
    members = group_members(pgid)
    assert members
    rpc_dir = rpc_sockets_of(engine)
    started = time.monotonic()
    await engine.stop()
    assert time.monotonic() - started < 25
    assert engine.state == ReplicaState.STOPPING and engine.stopped
    assert engine.pid is None
    assert group_members(pgid) == []
    assert [p for p in members if alive(p)] == []
    assert not rpc_dir.exists()  # vLLM leaves its socket files behind after a clean stop too (three a start)
    await engine.stop()  # idempotent
