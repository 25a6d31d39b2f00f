"""Standby engines (worker/standby.py): adoption, a fresh standby after it, the fallbacks, no orphans.

These run the real standby program (worker/standby_main.py) and the real supervision, over bench's stand-in
engine module (bench/fake_vllm: `vllm.entrypoints.openai.api_server` answering at once, no torch), so each start
takes a second, not thirty. The real vLLM engine through a standby is tested in tests/test_engine.py (its shared
engine is adopted from a standby) and end to end by every stack whose workers keep the default STANDBY_ENGINES=1.
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
from serverless_vllm.worker.engine import ENGINE_MODULE, EngineProcess, engine_environment
from serverless_vllm.worker.standby import StandbyPool, standby_main

from .harness import alive

FAKE_VLLM = Path(__file__).resolve().parents[1] / "bench" / "fake_vllm"


def cmdline_of(pid: int | None) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def eventually(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    # The stand-in engine module for standbys and plain starts alike.
    monkeypatch.setenv("PYTHONPATH", str(FAKE_VLLM))
    return WorkerSettings.model_validate({"worker_id": "w-standby", "log_dir": str(tmp_path / "logs")})


def make_pool(settings: WorkerSettings, busy: Callable[[], bool] = lambda: False, **kw: object) -> StandbyPool:
    return StandbyPool(
        1,
        lambda: engine_environment(settings, has_gpu=False),
        nice=0,
        busy=busy,
        module=ENGINE_MODULE,
        **kw,  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture
async def pool(settings: WorkerSettings) -> AsyncIterator[StandbyPool]:
    p = make_pool(settings)
    p.start()
    yield p
    pids = [s.pid for s in p.standbys if s.pid is not None]
    await p.stop()
    assert not [pid for pid in pids if alive(pid)], "a standby outlived the pool's stop()"


def engine_for(settings: WorkerSettings, pool: StandbyPool | None, replica: str = "r-1") -> EngineProcess:
    assignment = Assignment(replica_id=replica, alias="tiny", model_name="/m", engine=EngineArgs())
    return EngineProcess(assignment, settings, has_gpu=False, standbys=pool)


async def ready_standby(pool: StandbyPool, timeout: float = 30) -> int:
    assert await eventually(lambda: any(s.ready for s in pool.standbys), timeout), [s.lines for s in pool.standbys]
    pid = pool.standbys[0].pid
    assert pid is not None
    return pid


async def test_a_start_adopts_the_standby_and_a_fresh_one_follows(settings: WorkerSettings, pool: StandbyPool) -> None:
    standby_pid = await ready_standby(pool)
    engine = engine_for(settings, pool)
    await engine.start()
    try:
        assert await engine.wait_ready(30), engine.log_tail(20)
        assert engine.pid == standby_pid  # the standby became the engine: no new process was spawned
        assert pool.adoptions == 1
        # Retitled as a plain start: what looks for engines by their command line finds it.
        cmdline = cmdline_of(engine.pid)
        assert cmdline.startswith(f"{sys.executable} -m {ENGINE_MODULE} --model /m"), cmdline
        async with httpx.AsyncClient(base_url=engine.base_url, timeout=10) as client:
            models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]  # the engine's own arguments reached it
        log_text = engine.log_path.read_text()
        assert "adopted standby-1" in log_text and standby_main.ADOPTED_LINE in log_text
        # A replacement, once the start is over: a new process, imports done.
        fresh = await ready_standby(pool)
        assert fresh != standby_pid and alive(fresh)
    finally:
        await engine.stop()
    assert not alive(standby_pid)


async def test_adoption_runs_the_module_as_main_with_the_engines_arguments_and_environment(
    settings: WorkerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that prints what it was given, standing by like any engine module.
    (tmp_path / "echo_engine.py").write_text(
        "import os, sys\n"
        "if __name__ == '__main__':\n"
        "    print('ECHO', sys.argv[1:], os.environ.get('SVLLM_MARK'), os.environ.get('DROPPED'), flush=True)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("DROPPED", "from-the-worker")
    p = StandbyPool(1, lambda: dict(os.environ), nice=0, busy=lambda: False, module="echo_engine")
    p.start()
    try:
        assert await eventually(lambda: any(s.ready for s in p.standbys), 30)
        standby = p.take("echo_engine")
        assert standby is not None and p.take("echo_engine") is None
        lines: list[str] = []
        env = {k: v for k, v in os.environ.items() if k != "DROPPED"} | {"SVLLM_MARK": "engine-7"}
        launch = standby.adopt(["--port", "1234", "--x"], env, port=1234, name="r-echo", sink=lines.append)
        assert await launch.exited == 0
        await launch.cleanup()
        # The order's environment replaces the standby's own (DROPPED was only in the launch environment).
        assert "ECHO ['--port', '1234', '--x'] engine-7 None" in lines, lines
    finally:
        await p.stop()


async def test_a_killed_standby_falls_back_to_a_plain_start(settings: WorkerSettings, pool: StandbyPool) -> None:
    standby_pid = await ready_standby(pool)
    os.kill(standby_pid, signal.SIGKILL)  # dead, perhaps not yet reaped: take() may still hand it over
    engine = engine_for(settings, pool)
    await engine.start()
    try:
        assert await engine.wait_ready(30), engine.log_tail(20)
        assert engine.pid is not None and engine.pid != standby_pid
        assert engine.state is ReplicaState.READY and engine.error is None
    finally:
        await engine.stop()


# Fault injection: a standby that imports, says it is ready, takes its order, and dies instead of serving.
_DIES_AT_ADOPTION = textwrap.dedent(
    f"""
    import sys
    print({standby_main.READY_LINE!r}, flush=True)
    sys.stdin.readline()
    print("standby fault injection: exiting at adoption", flush=True)
    sys.exit(7)
    """
)


async def test_a_start_that_fails_in_the_standby_is_retried_plainly(settings: WorkerSettings, tmp_path: Path) -> None:
    program = tmp_path / "dies_at_adoption.py"
    program.write_text(_DIES_AT_ADOPTION)
    p = make_pool(settings, program=str(program))
    p.start()
    try:
        standby_pid = await ready_standby(p)
        engine = engine_for(settings, p)
        await engine.start()
        try:
            assert await engine.wait_ready(30), engine.log_tail(20)
            assert engine.pid != standby_pid and engine.state is ReplicaState.READY
            log_text = engine.log_path.read_text()
            assert "exiting at adoption" in log_text  # the failed try is in the engine's log, then the plain one
            assert log_text.count("=== serverless-vllm launch") == 2
        finally:
            await engine.stop()
    finally:
        await p.stop()


async def test_no_new_standby_while_an_engine_is_starting(settings: WorkerSettings) -> None:
    starting = True
    p = make_pool(settings, busy=lambda: starting)
    try:
        p.start()
        await asyncio.sleep(1.5)
        assert p.standbys == []  # busy from the start: not even the first one
        starting = False
        p.nudge()
        pid = await ready_standby(p)
        starting = True
        assert p.take(ENGINE_MODULE) is not None
        await asyncio.sleep(1.5)
        assert p.standbys == []
        starting = False
        p.nudge()
        assert await ready_standby(p) != pid
    finally:
        await p.stop()


# A worker in miniature that keeps one standby, reports its pid, and waits to be killed.
_POOL_WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from serverless_vllm.worker.standby import StandbyPool
    from serverless_vllm.worker.engine import ENGINE_MODULE

    async def main():
        pool = StandbyPool(1, lambda: dict(os.environ), nice=0, busy=lambda: False, module=ENGINE_MODULE)
        pool.start()
        while not any(s.ready for s in pool.standbys):
            await asyncio.sleep(0.05)
        s = pool.standbys[0]
        print(json.dumps({"standby": s.pid, "guard": s.launch.guard.pid}), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_a_standby_does_not_outlive_its_worker(settings: WorkerSettings) -> None:
    worker = subprocess.Popen([sys.executable, "-c", _POOL_WORKER], stdout=subprocess.PIPE, text=True)
    pids: dict[str, int] = {}
    try:
        assert worker.stdout is not None
        pids = json.loads(worker.stdout.readline())
        assert alive(pids["standby"]) and alive(pids["guard"])
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
