"""The fork server (worker/fork_server.py): engines forked from it, their exits, the fallbacks, no orphans.

These run the real fork server program (worker/fork_server_main.py) and the real supervision, over bench's stand-in
engine module (bench/fake_vllm: `vllm.entrypoints.openai.api_server` answering at once, no torch), so each start
takes a second, not thirty. The real vLLM engine forked from it is tested in tests/test_engine.py (its shared
engine) and end to end by every stack (the worker's default, ENGINE_FORK_SERVER=1).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from serverless_vllm.config import WorkerSettings
from serverless_vllm.schemas import Assignment, EngineArgs, ReplicaState
from serverless_vllm.worker import fork_server
from serverless_vllm.worker.engine import ENGINE_MODULE, EngineProcess, engine_environment
from serverless_vllm.worker.fork_server import UNKNOWN_EXIT, ForkServer, fork_server_main

from .harness import alive

FAKE_VLLM = Path(__file__).resolve().parents[1] / "bench" / "fake_vllm"


def cmdline_of(pid: int | None) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pids_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def eventually(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    # The stand-in engine module for the fork server and plain starts alike.
    monkeypatch.setenv("PYTHONPATH", str(FAKE_VLLM))
    return WorkerSettings.model_validate({"worker_id": "w-fork", "log_dir": str(tmp_path / "logs")})


def make_server(settings: WorkerSettings, busy: Callable[[], bool] = lambda: False, **kw: object) -> ForkServer:
    return ForkServer(
        True,
        lambda: engine_environment(settings, has_gpu=False),
        nice=0,
        busy=busy,
        module=ENGINE_MODULE,
        **kw,  # type: ignore[arg-type]
    )


def server_running(settings: WorkerSettings, program: Path, source: str) -> ForkServer:
    """A fork server started from another program (`source`, written to `program`): faults, slow imports."""
    program.write_text(source)
    s = make_server(settings, program=str(program))
    s.start()
    return s


@pytest_asyncio.fixture
async def server(settings: WorkerSettings) -> AsyncIterator[ForkServer]:
    s = make_server(settings)
    s.start()
    yield s
    pid = s.pid
    await s.stop()
    assert pid is None or not alive(pid), "the fork server outlived its stop()"


# A folder that exists (the stand-in engine loads nothing; a missing path is refused before any launch).
MODEL = str(Path(__file__).parent)


def engine_for(settings: WorkerSettings, server: ForkServer | None, replica: str = "r-1") -> EngineProcess:
    assignment = Assignment(replica_id=replica, alias=f"tiny-{replica}", model_name=MODEL, engine=EngineArgs())
    return EngineProcess(assignment, settings, has_gpu=False, fork_server=server)


async def ready_server(server: ForkServer, timeout: float = 30) -> int:
    assert await eventually(lambda: server.ready, timeout), list(server.lines)
    assert server.pid is not None
    return server.pid


async def test_starts_at_once_each_fork_from_the_server(settings: WorkerSettings, server: ForkServer) -> None:
    server_pid = await ready_server(server)
    engines = [engine_for(settings, server, f"r-{n}") for n in range(3)]
    await asyncio.gather(*(e.start() for e in engines))
    try:
        for engine in engines:
            assert await engine.wait_ready(30), engine.log_tail(20)
            assert engine.pid is not None and parent_of(engine.pid) == server_pid  # forked: no import of its own
            # Retitled as a plain start: what looks for engines by their command line finds it.
            cmdline = cmdline_of(engine.pid)
            assert cmdline.startswith(f"{sys.executable} -m {ENGINE_MODULE} --model {MODEL}"), cmdline
            async with httpx.AsyncClient(base_url=engine.base_url, timeout=10) as client:
                models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == [engine.alias]  # its own arguments reached it
            log_text = engine.log_path.read_text()
            assert "forked by the fork server" in log_text and fork_server_main.FORKED_LINE in log_text
        assert server.forks == 3 and server.pid == server_pid and server.alive
    finally:
        await asyncio.gather(*(e.stop() for e in engines))
    assert not [e for e in engines if e.pid is not None]


# A module that prints what it was given and exits with a code of its own.
_ECHO = textwrap.dedent(
    """
    import os, sys, time
    time.sleep(float(os.environ.get("ECHO_IMPORT_S", "0")))  # a slow import, for orders that come during it
    if __name__ == '__main__':
        if not os.environ.get("ECHO_SILENT"):  # a first line to a pipe nobody reads would end it (EPIPE)
            print('ECHO', sys.argv[1:], os.environ.get('SVLLM_MARK'), os.environ.get('DROPPED'), flush=True)
        time.sleep(float(os.environ.get("ECHO_RUN_S", "0")))
        sys.exit(int(os.environ.get("ECHO_EXIT", "0")))
    """
)


@pytest.fixture
def echo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    (tmp_path / "echo_engine.py").write_text(_ECHO)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("DROPPED", "from-the-worker")
    return {k: v for k, v in os.environ.items() if k != "DROPPED"}


async def fork_echo(
    server: ForkServer, env: dict[str, str], *argv: str, timeout: float = 30, module: str = "echo_engine"
) -> list[str] | None:
    """Fork the echo module; its output lines once it exited, with its exit code last, or None (no fork)."""
    lines: list[str] = []

    async def pump(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            lines.append(line.decode().rstrip())

    launch = await server.fork(module, list(argv), env, port=1, name="r-echo", pump=pump, timeout=timeout)
    if launch is None:
        return None
    code = await asyncio.wait_for(asyncio.shield(launch.exited), 30)
    await launch.cleanup()
    return [*lines, f"exit {code}"]


async def test_a_fork_runs_the_module_as_main_with_its_arguments_environment_and_exit_code(
    echo_env: dict[str, str],
) -> None:
    s = ForkServer(True, lambda: dict(os.environ), nice=0, busy=lambda: False, module="echo_engine")
    s.start()
    try:
        await ready_server(s)
        env = echo_env | {"SVLLM_MARK": "engine-7", "ECHO_EXIT": "7"}
        lines = await fork_echo(s, env, "--port", "1234", "--x")
        # The order's environment replaces the server's own (DROPPED was only in the server's environment), and the
        # exit code is the module's, reported by the server (the engine is its child, not ours).
        assert lines is not None and lines[-2:] == ["ECHO ['--port', '1234', '--x'] engine-7 None", "exit 7"], lines
        # Another module than the server's: not forked.
        other = await s.fork(ENGINE_MODULE, [], env, port=1, name="r", pump=lambda _: asyncio.sleep(0), timeout=5)
        assert other is None
    finally:
        await s.stop()


# The echo module, but with huggingface_hub imported by the server, as vLLM's server imports it.
_HUB_ECHO = "import huggingface_hub.constants as c\nif __name__ == '__main__':\n    print('OFFLINE', c.HF_HUB_OFFLINE)"


async def test_an_engine_started_offline_is_not_forked_from_a_server_started_online(
    echo_env: dict[str, str], tmp_path: Path
) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: a child forked from a server that imported it online
    would look the model up on the hub though its environment says offline (with the hub down, vLLM then fails after
    minutes of retries). Such an engine starts plainly (fork() gives None); one whose value is the server's forks."""
    (tmp_path / "hub_echo.py").write_text(_HUB_ECHO)
    online = echo_env | {"HF_HUB_OFFLINE": "0"}
    s = ForkServer(True, lambda: online, nice=0, busy=lambda: False, module="hub_echo")
    s.start()
    try:
        await ready_server(s)
        lines = await fork_echo(s, online, module="hub_echo")
        assert lines is not None and lines[-2:] == ["OFFLINE False", "exit 0"], lines
        for offline in ({"HF_HUB_OFFLINE": "1"}, {"TRANSFORMERS_OFFLINE": "1"}):
            lines = await fork_echo(s, online | offline, module="hub_echo")
            assert lines is None, lines  # forked, it would print OFFLINE False
        assert s.forks == 1
    finally:
        await s.stop()


async def test_an_order_during_the_imports_is_served_after_them(echo_env: dict[str, str]) -> None:
    s = ForkServer(True, lambda: echo_env | {"ECHO_IMPORT_S": "2"}, nice=0, busy=lambda: False, module="echo_engine")
    s.start()
    try:
        assert await eventually(lambda: s.alive, 10)
        assert not s.ready  # still importing
        lines = await fork_echo(s, echo_env | {"SVLLM_MARK": "early"})
        assert s.ready and lines is not None and lines[-2:] == ["ECHO [] early None", "exit 0"], lines
    finally:
        await s.stop()


async def test_a_fork_given_up_on_is_killed_when_it_comes(echo_env: dict[str, str]) -> None:
    s = ForkServer(True, lambda: echo_env | {"ECHO_IMPORT_S": "2"}, nice=0, busy=lambda: False, module="echo_engine")
    s.start()
    try:
        assert await eventually(lambda: s.alive, 10)
        marker = "--given-up-on"
        # The start stops waiting before the server's imports end (it then starts plainly): the child forked after
        # that would be an engine nobody supervises. Two things end it: the server's report of it is answered with
        # SIGKILL, and its log pipe has no reader left (its first line fails). Seen failing with both left out.
        env = echo_env | {"ECHO_RUN_S": "60", "ECHO_SILENT": "1"}
        assert await fork_echo(s, env, marker, timeout=0.5) is None
        await ready_server(s)
        await asyncio.sleep(1.0)
        assert pids_with(marker) == []
        # The server still serves the next order.
        lines = await fork_echo(s, echo_env, "--after")
        assert lines is not None and lines[-1] == "exit 0", lines
    finally:
        await s.stop()


async def test_a_dead_server_means_plain_starts_and_its_engines_keep_running(
    settings: WorkerSettings, server: ForkServer
) -> None:
    await ready_server(server)
    forked = engine_for(settings, server, "r-forked")
    await forked.start()
    try:
        assert await forked.wait_ready(30), forked.log_tail(20)
        server_pid = server.pid
        assert server_pid is not None and forked.pid is not None
        os.kill(server_pid, signal.SIGKILL)
        assert await eventually(lambda: not server.alive, 10)
        plain = engine_for(settings, server, "r-plain")
        await plain.start()
        try:
            assert await plain.wait_ready(30), plain.log_tail(20)
            assert plain.pid is not None and parent_of(plain.pid) == os.getpid()  # spawned by the worker
            assert plain.state is ReplicaState.READY and plain.error is None
        finally:
            await plain.stop()
        # The forked engine outlived its server, still served, and its end is still seen (no status to report).
        assert forked.state is ReplicaState.READY and alive(forked.pid)
        launch = forked._runs.launch
        assert launch is not None
        os.kill(forked.pid, signal.SIGKILL)
        assert await asyncio.wait_for(asyncio.shield(launch.exited), 10) == UNKNOWN_EXIT
        # The server is replaced (after its backoff): later starts fork again.
        assert await eventually(lambda: server.ready and server.pid != server_pid, 30)
    finally:
        await forked.stop()


# A fork server whose imports take seconds longer (a loaded machine), to see who waits for them.
_SLOW_IMPORTS = textwrap.dedent(
    """
    import time
    time.sleep(3)
    from serverless_vllm.worker import fork_server_main
    fork_server_main.main()
    """
)


@pytest_asyncio.fixture
async def slow_server(settings: WorkerSettings, tmp_path: Path) -> AsyncIterator[ForkServer]:
    """A fork server started, still importing (for 3 s more)."""
    s = server_running(settings, tmp_path / "slow_imports.py", _SLOW_IMPORTS)
    try:
        assert await eventually(lambda: s.alive, 10)
        yield s
    finally:
        await s.stop()


@pytest_asyncio.fixture
async def early_engine(settings: WorkerSettings, slow_server: ForkServer) -> AsyncIterator[EngineProcess]:
    """An engine started while `slow_server` still imports (stopped at the end, if the test did not)."""
    engine = engine_for(settings, slow_server, "r-early")
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def test_a_start_during_the_imports_does_not_hold_up_its_caller(
    slow_server: ForkServer, early_engine: EngineProcess
) -> None:
    s, engine = slow_server, early_engine
    # start() returned while the server still imports: the worker's loop that called it (its heartbeats to the
    # manager) goes on; the launch waits in the engine's own task.
    assert not s.ready and engine.state is ReplicaState.STARTING
    assert await engine.wait_ready(30), engine.log_tail(20)
    assert s.ready and engine.pid is not None and parent_of(engine.pid) == s.pid


async def test_a_stop_during_the_imports_does_not_wait_for_them(
    slow_server: ForkServer, early_engine: EngineProcess
) -> None:
    s, engine = slow_server, early_engine
    assert await eventually(lambda: s._pending, 5)  # its order is given, and waits for the server's imports
    await engine.stop()
    # Stopped before the server could fork it (its imports take 3 s more): the stop did not wait for them. Seen
    # failing with the stop not ending that wait (the engine is forked, then stopped).
    assert not s.ready and engine.state is ReplicaState.STOPPING and engine.pid is None
    assert "forked by the fork server" not in engine.log_path.read_text()
    # The child the server forks for that order afterwards ends (killed at its report, and its log pipe has no
    # reader: test_a_fork_given_up_on_is_killed_when_it_comes checks the first alone): no engine unsupervised.
    await ready_server(s)
    await asyncio.sleep(1.0)
    assert pids_with("tiny-r-early") == []
    assert s.alive  # and the server serves on


# A fork server whose interpreter teardown would take long: an exit handler stands in for the 2 s that tearing
# down the imported vLLM (torch) takes at a normal exit.
_SLOW_TEARDOWN = textwrap.dedent(
    """
    import atexit, time
    from serverless_vllm.worker import fork_server_main
    atexit.register(time.sleep, 60)
    fork_server_main.main()
    """
)


async def test_a_released_server_exits_without_its_teardown(settings: WorkerSettings, tmp_path: Path) -> None:
    s = server_running(settings, tmp_path / "slow_teardown.py", _SLOW_TEARDOWN)
    await ready_server(s)
    launch = s.launch
    assert launch is not None
    await s.stop()
    # Exited by itself, at once (0), not stopped with SIGTERM after the 5 s the worker's stop waits for it (-15):
    # seen failing with a normal return from its main().
    assert launch.proc.returncode == 0


# Fault injection: a fork server whose children, set up as engines, die instead of running the engine module.
_DIES_IN_THE_FORK = textwrap.dedent(
    """
    import sys, types
    from serverless_vllm.worker import fork_server_main

    def die(*args, **kwargs):
        print("fork fault injection: exiting in the forked engine", flush=True)
        sys.exit(7)

    fork_server_main.runpy = types.SimpleNamespace(run_module=die)
    fork_server_main.main()
    """
)


async def test_a_start_that_fails_in_the_fork_is_retried_plainly(settings: WorkerSettings, tmp_path: Path) -> None:
    s = server_running(settings, tmp_path / "dies_in_the_fork.py", _DIES_IN_THE_FORK)
    try:
        server_pid = await ready_server(s)
        engine = engine_for(settings, s)
        await engine.start()
        try:
            assert await engine.wait_ready(30), engine.log_tail(20)
            assert engine.pid is not None and parent_of(engine.pid) != server_pid
            assert engine.state is ReplicaState.READY
            log_text = engine.log_path.read_text()
            # The failed try is in the engine's log, then the plain one.
            assert "exiting in the forked engine" in log_text
            assert log_text.count("=== serverless-vllm launch") == 2
        finally:
            await engine.stop()
    finally:
        await s.stop()


# Fault injection: a fork server whose children refuse their arguments as vLLM's argparse does (usage, then the
# error, exit code 2), as a start with an argument vLLM does not know would, forked or not.
_REFUSES_ITS_ARGUMENTS = textwrap.dedent(
    """
    import sys, types
    from serverless_vllm.worker import fork_server_main

    def refuse(*args, **kwargs):
        print("usage: api_server.py [-h] [--log-level {CRITICAL,ERROR,WARNING,INFO,DEBUG,NOTSET}]", flush=True)
        print("api_server.py: error: unrecognized arguments: --no-such-flag", flush=True)
        sys.exit(2)

    fork_server_main.runpy = types.SimpleNamespace(run_module=refuse)
    fork_server_main.main()
    """
)


async def test_a_start_refused_for_its_arguments_fails_without_a_plain_retry(
    settings: WorkerSettings, tmp_path: Path
) -> None:
    s = server_running(settings, tmp_path / "refuses_its_arguments.py", _REFUSES_ITS_ARGUMENTS)
    try:
        await ready_server(s)
        engine = engine_for(settings, s)
        await engine.start()
        try:
            assert await eventually(lambda: engine.state is ReplicaState.FAILED, 30), engine.log_tail(20)
            reason = "engine exited with code 2 before becoming ready: api_server.py: error: unrecognized arguments"
            assert engine.error == reason + ": --no-such-flag"
            # The plain way would only be refused again, some 20 s of vLLM's imports later: not tried.
            assert engine.log_path.read_text().count("=== serverless-vllm launch") == 1
        finally:
            await engine.stop()
    finally:
        await s.stop()


async def test_no_server_launch_while_an_engine_is_starting(settings: WorkerSettings) -> None:
    starting = True
    s = make_server(settings, busy=lambda: starting)
    try:
        s.start()
        await asyncio.sleep(1.5)
        assert s.pid is None  # busy from the start: not launched
        engine = engine_for(settings, s)
        await engine.start()  # no server: a plain start
        try:
            assert await engine.wait_ready(30), engine.log_tail(20)
            assert engine.pid is not None and parent_of(engine.pid) == os.getpid()
        finally:
            await engine.stop()
        starting = False
        s.nudge()
        await ready_server(s)
    finally:
        await s.stop()


async def test_a_server_that_keeps_dying_is_given_up(
    settings: WorkerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fork_server, "MAX_FAILURES", 2)  # the real backoff (2 s after the first), fewer tries
    # Fault injection: a server that exits before its imports.
    dies = "import sys\nprint('fork server fault injection: exiting', flush=True)\nsys.exit(5)\n"
    s = server_running(settings, tmp_path / "dies_at_once.py", dies)
    try:
        assert await eventually(lambda: s.launches == 2 and s.launch is None, 20)
        await asyncio.sleep(3)  # past the next backoff: no third launch
        assert s.launches == 2 and s.pid is None
        engine = engine_for(settings, s)
        await engine.start()  # the plain way
        try:
            assert await engine.wait_ready(30), engine.log_tail(20)
            assert engine.pid is not None and parent_of(engine.pid) == os.getpid()
        finally:
            await engine.stop()
    finally:
        await s.stop()


# A worker in miniature: a fork server and one engine forked from it; it reports their pids and waits to be killed.
_MINI_WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from serverless_vllm.worker.fork_server import ForkServer

    async def main():
        server = ForkServer(True, lambda: dict(os.environ), nice=0, busy=lambda: False, module="echo_engine")
        server.start()
        while not server.ready:
            await asyncio.sleep(0.05)
        env = dict(os.environ, ECHO_RUN_S="3600")
        printed = asyncio.Event()

        async def pump(stream):
            while line := await stream.readline():
                if line.startswith(b"ECHO"):
                    printed.set()

        launch = await server.fork("echo_engine", [], env, port=1, name="r", pump=pump, timeout=30)
        # Past its last line: from here a dead worker's closed log pipe (EPIPE) cannot end it, only its guard can.
        await printed.wait()
        pids = {"server": server.pid, "server_guard": server.launch.guard.pid, "engine": launch.proc.pid,
                "engine_guard": launch.guard.pid}
        print(json.dumps(pids), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_the_server_and_its_engines_do_not_outlive_their_worker(echo_env: dict[str, str]) -> None:
    worker = subprocess.Popen([sys.executable, "-c", _MINI_WORKER], stdout=subprocess.PIPE, text=True, env=echo_env)
    pids: dict[str, int] = {}
    try:
        assert worker.stdout is not None
        pids = json.loads(worker.stdout.readline())
        assert all(alive(p) for p in pids.values()), pids
        worker.kill()  # kill -9: no clean-up code of the worker runs
        worker.wait(10)
        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, pid in pids.items() if alive(pid)]
    finally:
        if worker.poll() is None:
            worker.kill()
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
