"""An engine alive but mute is found by its health probe: worker/liveness.py, against a real local HTTP server
that answers, then stops answering (fault injection: it accepts connections and reads, but never replies)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from serverless_vllm.worker.liveness import LivenessProbe
from serverless_vllm.worker.spawn import Launch


class HealthServer:
    """/health on 127.0.0.1: 200 while `answering`, else the request is read and never answered."""

    def __init__(self) -> None:
        self.answering = True
        self.alternate = False  # every other probe unanswered
        self.probes = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/health"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            self.probes += 1
            if not self.answering or (self.alternate and self.probes % 2 == 0):
                await asyncio.sleep(3600)  # mute: the probe's timeout must end it
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()


class FakeLaunch:
    """What the probe reads of a Launch: the task that ends with the process."""

    def __init__(self) -> None:
        self.exit = asyncio.get_running_loop().create_future()
        self.exited = asyncio.ensure_future(self.exit)


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    s = HealthServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


def probe(client: httpx.AsyncClient, failures: int = 3) -> LivenessProbe:
    return LivenessProbe(lambda: client, interval_s=0.05, timeout_s=0.2, failures=failures)


def as_launch(launch: FakeLaunch) -> Launch:
    return cast(Launch, cast(Any, launch))


async def test_a_mute_engine_is_reported_after_the_failures_in_a_row(
    server: HealthServer, client: httpx.AsyncClient
) -> None:
    launch = FakeLaunch()
    watch = asyncio.create_task(probe(client).watch(as_launch(launch), server.url, lambda: False))
    await asyncio.sleep(0.4)
    assert not watch.done() and server.probes >= 3  # answering: watched, not reported
    server.answering = False
    reason = await asyncio.wait_for(watch, 5)
    assert reason is not None and "3 in a row" in reason and "no answer within 0.2 s" in reason


async def test_misses_that_are_not_in_a_row_are_forgiven(server: HealthServer, client: httpx.AsyncClient) -> None:
    launch = FakeLaunch()
    watch = asyncio.create_task(probe(client, failures=2).watch(as_launch(launch), server.url, lambda: False))
    server.alternate = True  # a miss, an answer, a miss...: never two in a row
    await asyncio.sleep(1.5)
    assert server.probes >= 4
    assert not watch.done()
    launch.exit.set_result(0)
    assert await asyncio.wait_for(watch, 5) is None


async def test_an_exit_ends_the_watch_without_a_verdict(server: HealthServer, client: httpx.AsyncClient) -> None:
    launch = FakeLaunch()
    watch = asyncio.create_task(probe(client).watch(as_launch(launch), server.url, lambda: False))
    await asyncio.sleep(0.1)
    launch.exit.set_result(-9)
    assert await asyncio.wait_for(watch, 5) is None


async def test_probes_off_wait_for_the_exit_only(server: HealthServer, client: httpx.AsyncClient) -> None:
    server.answering = False
    launch = FakeLaunch()
    off = LivenessProbe(lambda: client, interval_s=0, timeout_s=0.2, failures=1)
    watch = asyncio.create_task(off.watch(as_launch(launch), server.url, lambda: False))
    await asyncio.sleep(0.5)
    assert not watch.done() and server.probes == 0
    launch.exit.set_result(0)
    assert await asyncio.wait_for(watch, 5) is None
