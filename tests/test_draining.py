"""Draining with real processes (issue 19, point 2): scale-down, model delete, eviction and a worker's own SIGTERM
under load cut no request, and the drain timeout bounds one that outlasts it.

Manager, router and workers are the real `svllm` services on loopback; the engines are the slow stand-in of
tests/slow_engine (first on the engines' PYTHONPATH): each token takes TOKEN_MS, so a request is still running when
its replica is drained, and it logs every request's end and every engine's start and exit. Client threads send
requests back to back (streamed and whole completions) and check each answer: 200, every token, `[DONE]`. The
figures go to build/reliability/draining.json (docs/reliability.md quotes them). The unit tests of the same rules:
tests/unit/test_draining.py (manager), tests/unit/test_worker_drain.py (worker).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import GPUWorkerDouble, Stack, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
SLOW_ENGINE = REPO / "tests" / "slow_engine"
TOKEN_MS = 100
TOKENS = 40  # 4 s a request
DRAIN_TIMEOUT = 60  # the stack's workers; the drain-timeout test's own worker has SHORT_DRAIN
SHORT_DRAIN = 3
FIGURES = Path(os.environ.get("SVLLM_OBSERVATIONS_DIR", REPO / "build" / "reliability")) / "draining.json"


def stack_env(tmp: Path, **more: str) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(SLOW_ENGINE), os.environ.get("PYTHONPATH")) if p),
        "SLOW_ENGINE_TOKEN_MS": str(TOKEN_MS),
        "SLOW_ENGINE_LOG": str(tmp / "engine-events.jsonl"),
        "ENGINE_FORK_SERVER": "0",
        "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        "HEARTBEAT_INTERVAL": "0.5",
        "CPU_SLOTS": "2",
        **more,
    }


def engine_events(stack: Stack, event: str, model: str | None = None) -> list[dict[str, Any]]:
    path = Path(stack.env["SLOW_ENGINE_LOG"])
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in lines if e["event"] == event and (model is None or e["model"] == model)]


def record_figures(name: str, figures: dict[str, Any]) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    known[name] = {**figures, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    FIGURES.write_text(json.dumps(known, indent=2) + "\n")


# --------------------------------------------------------------------------- the load


@dataclass
class Result:
    stream: bool
    begin: float
    asked: int = TOKENS
    end: float = 0.0
    status: int = 0
    tokens: int = 0
    done: bool = False  # streamed: [DONE] came; whole: the body parsed
    error: str | None = None

    @property
    def whole(self) -> bool:
        """200, every token, the end of the answer: not cut."""
        return self.status == 200 and self.tokens == self.asked and self.done and self.error is None


def send(client: httpx.Client, url: str, alias: str, stream: bool, tokens: int = TOKENS) -> Result:
    body = {"model": alias, "prompt": "hi", "max_tokens": tokens, "stream": stream}
    result = Result(stream=stream, begin=time.time(), asked=tokens)
    try:
        if stream:
            with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                result.status = resp.status_code
                if resp.status_code != 200:
                    result.error = resp.read().decode(errors="replace")[:300]
                for line in resp.iter_lines() if resp.status_code == 200 else ():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        result.done = True
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        result.error = json.dumps(event)[:300]
                    elif event.get("choices"):
                        result.tokens += 1
        else:
            resp = client.post(f"{url}/v1/completions", json=body)
            result.status = resp.status_code
            if resp.status_code == 200:
                result.tokens, result.done = resp.json()["usage"]["completion_tokens"], True
            else:
                result.error = resp.text[:300]
    except Exception as exc:  # a transport error is a cut request, never swallowed
        result.error = repr(exc)
    result.end = time.time()
    return result


class Load:
    """Client threads sending requests back to back (`streams` streamed, `whole` not) until stopped."""

    def __init__(self, url: str, alias: str, streams: int = 3, whole: int = 1, tokens: int = TOKENS) -> None:
        self.url, self.alias, self.tokens = url, alias, tokens
        self.results: list[Result] = []
        self.failures: list[str] = []  # a client thread that died
        self._stop = threading.Event()
        self._lock = threading.Lock()
        kinds = [True] * streams + [False] * whole
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in kinds]

    def _client(self, stream: bool) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
                while not self._stop.is_set():
                    result = send(client, self.url, self.alias, stream, self.tokens)
                    with self._lock:
                        self.results.append(result)
                    if result.status == 404:  # the model was deleted: nothing more to ask for
                        return
                    time.sleep(0.05)
        except BaseException as exc:  # an exception guard: a dead thread must fail the test, not hide
            self.failures.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Result]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"
        assert not self.failures, self.failures
        return self.results


def cut(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.whole]


def running_on(stack: Stack, pid: int, at: float, model: str) -> int:
    """Requests the engine `pid` was serving at time `at` (unix seconds), from its own log."""
    return sum(1 for e in engine_events(stack, "request", model) if e["pid"] == pid and e["begin"] <= at < e["end"])


def engines_of(stack: Stack, alias: str) -> dict[str, dict[str, Any]]:
    """replica id -> its engine as its worker reports it (with pid and worker)."""
    out = {}
    for worker in stack.get("/workers").json():
        for engine in worker["engines"]:
            if engine["alias"] == alias:
                out[engine["replica_id"]] = {**engine, "worker_id": worker["worker_id"]}
    return out


def register(stack: Stack, alias: str, **policy: Any) -> None:
    folder = stack.tmp / "stand-in"  # what the slow stand-in "loads": a folder that exists
    folder.mkdir(exist_ok=True)
    body = {"alias": alias, "model_name": str(folder), "routing": "least_loaded", **policy}
    resp = stack.post("/v1/models/register", json=body)
    assert resp.status_code == 200, resp.text


def ready_replicas(stack: Stack, alias: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        replicas = stack.model(alias)["replicas"]
        return replicas if [r["state"] for r in replicas] == ["ready"] * n else None

    return wait_until(ready, timeout, interval=0.2, what=f"{n} ready replica(s) of {alias}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("draining")
    s = Stack(tmp, env=stack_env(tmp, SCALE_DOWN_DELAY="2")).start(workers=2)
    try:
        yield s
    finally:
        s.stop()


# --------------------------------------------------------------------------- scale-down, delete, SIGTERM


def test_scale_down_under_load_cuts_no_request(stack: Stack) -> None:
    register(stack, "down", min_replicas=2, max_replicas=2)
    replicas = ready_replicas(stack, "down", 2)
    with Load(stack.router.url, "down", streams=4, whole=2) as load:
        time.sleep(3 * TOKEN_MS * TOKENS / 1000 / 2)  # both replicas in the middle of requests
        engines = engines_of(stack, "down")
        began = time.time()
        resp = httpx.patch(
            f"{stack.router.url}/v1/models/down", json={"min_replicas": 1, "max_replicas": 1}, timeout=10
        )
        assert resp.status_code == 200, resp.text

        def drained() -> str | None:
            left = [r["replica_id"] for r in stack.model("down")["replicas"]]
            return next(iter(set(engines) - set(left)), None) if len(left) == 1 else None

        gone = wait_until(drained, DRAIN_TIMEOUT, interval=0.2, what="the drained replica gone")
        gone_at = time.time()
        time.sleep(1.5 * TOKEN_MS * TOKENS / 1000)  # the load goes on on the replica left
    results = load.stop()
    pid = engines[gone]["pid"]
    (exit_event,) = [e for e in engine_events(stack, "exit", "down") if e["pid"] == pid]
    in_flight = running_on(stack, pid, began + 0.5, "down")  # when the manager took it out of routing
    served = [e for e in engine_events(stack, "request", "down") if e["pid"] == pid]
    assert cut(results) == [], cut(results)
    assert in_flight >= 1, "the drained replica had nothing in flight: the test proved nothing"
    assert exit_event["running"] == 0  # stopped only once its requests were done
    assert exit_event["t"] >= max(e["end"] for e in served)
    assert all(e["completed"] for e in served)
    assert httpx.delete(f"{stack.router.url}/v1/models/down", timeout=10).status_code in (200, 204)  # its room back
    record_figures(
        "scale_down",
        {
            "requests": len(results),
            "cut": len(cut(results)),
            "in_flight_on_drained_replica": in_flight,
            "drained_replica_stopped_after_s": round(exit_event["t"] - began, 1),
            "replica_gone_after_s": round(gone_at - began, 1),
            "replicas_before": len(replicas),
        },
    )


def test_delete_under_load_lets_requests_in_flight_finish(stack: Stack) -> None:
    register(stack, "gone", min_replicas=1, max_replicas=1)
    ready_replicas(stack, "gone", 1)
    with Load(stack.router.url, "gone", streams=3, whole=1) as load:
        time.sleep(TOKEN_MS * TOKENS / 1000 / 2)
        (engine,) = engines_of(stack, "gone").values()
        deleted_at = time.time()
        resp = httpx.delete(f"{stack.router.url}/v1/models/gone", timeout=10)
        assert resp.status_code in (200, 204), resp.text
        wait_until(lambda: not engines_of(stack, "gone"), DRAIN_TIMEOUT, interval=0.2, what="its engine stopped")
    results = load.stop()
    before = [r for r in results if r.begin < deleted_at]
    after = [r for r in results if r.begin >= deleted_at]
    (exit_event,) = [e for e in engine_events(stack, "exit", "gone") if e["pid"] == engine["pid"]]
    assert before and cut(before) == [], cut(before)
    # After it, each is whole (sent in the moment before the routers learnt of the delete) or a 404 model_not_found.
    assert after and all(r.whole or r.status == 404 for r in after), after
    assert all(r.begin >= deleted_at for r in results if r.status == 404)
    assert exit_event["running"] == 0
    record_figures(
        "delete",
        {
            "requests_in_flight_at_delete": running_on(stack, engine["pid"], deleted_at, "gone"),
            "completed_of_those": len([r for r in before if r.end > deleted_at and r.whole]),
            "cut": len(cut(before)),
            "answered_404_after_delete": len([r for r in after if r.status == 404]),
            "engine_stopped_after_s": round(exit_event["t"] - deleted_at, 1),
        },
    )


def test_worker_sigterm_under_load_drains_then_exits(stack: Stack) -> None:
    """`docker compose stop` or `--scale` down of a worker: its requests in flight finish, the others go to the
    replica left and to the one the manager places instead, the worker exits once drained, and no dead worker is
    left behind. It stops w2 (the router's test below runs on w1). Its requests are longer than uvicorn's own graceful
    shutdown (5 s), which alone would let shorter ones end."""
    register(stack, "term", min_replicas=2, max_replicas=2)
    ready_replicas(stack, "term", 2)
    worker = stack.workers["w2"]
    assert worker.proc is not None
    tokens = 100  # 10 s a request
    with Load(stack.router.url, "term", streams=4, whole=2, tokens=tokens) as load:
        time.sleep(2.0)
        mine = [e for e in engines_of(stack, "term").values() if e["worker_id"] == "w2"]
        assert len(mine) == 1
        pid = mine[0]["pid"]
        signalled = time.time()
        worker.signal(signal.SIGTERM)
        assert wait_until(lambda: worker.proc.poll() is not None, DRAIN_TIMEOUT + 30, interval=0.1, what="w2 exits")
        exited = time.time()
        # Meanwhile the manager placed a replica on w1 instead: the model is back to 2 ready replicas.
        ready_replicas(stack, "term", 2)
        time.sleep(1.0)
    results = load.stop()
    (exit_event,) = [e for e in engine_events(stack, "exit", "term") if e["pid"] == pid]
    served = [e for e in engine_events(stack, "request", "term") if e["pid"] == pid]
    in_flight = running_on(stack, pid, signalled, "term")
    assert cut(results) == [], cut(results)
    assert in_flight >= 1, "w2 had nothing in flight: the test proved nothing"
    assert exit_event["running"] == 0 and all(e["completed"] for e in served)
    last_end = max(e["end"] for e in served)
    assert exited >= last_end and exited - signalled < DRAIN_TIMEOUT
    assert "w2" not in stack.workers_by_id()  # it left: no dead record, no alert
    record_figures(
        "worker_sigterm",
        {
            "requests": len(results),
            "cut": len(cut(results)),
            "in_flight_on_worker_at_sigterm": in_flight,
            "worker_exited_after_s": round(exited - signalled, 1),
            "exit_after_its_last_request_s": round(exited - last_end, 1),
        },
    )


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.ConnectError:
        return True
    return False


def test_router_sigterm_lets_its_requests_finish(stack: Stack) -> None:
    """`docker compose stop`, a rolling restart or a scale-down of a router: it takes no new connection at once, and
    the requests it is serving finish (ROUTER_DRAIN_TIMEOUT, 60 s by default) before it exits. uvicorn's own
    graceful shutdown (5 s, what the router had) cut these 10 s requests. Last of the module's stack: it stops the
    router."""
    ready_replicas(stack, "term", 2)  # both on w1 since w2 left
    router = stack.router
    proc = router.proc
    assert proc is not None
    tokens = 100  # 10 s a request
    results: list[Result] = []

    def client(stream: bool) -> None:
        with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as c:
            results.append(send(c, router.url, "term", stream, tokens))

    threads = [threading.Thread(target=client, args=(stream,)) for stream in (True, True, False)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    signalled = time.time()
    router.signal(signal.SIGTERM)
    wait_until(lambda: refused(router.url), 5, interval=0.1, what="the router to stop taking connections")
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    wait_until(lambda: proc.poll() is not None, 30, interval=0.1, what="the router to exit")
    exited = time.time()
    assert len(results) == 3 and cut(results) == [], results
    assert all(r.begin < signalled for r in results)  # every one was in flight at the signal
    assert exited - max(r.end for r in results) < 5  # it exits once they are done, not at the end of its timeout


# --------------------------------------------------------------------------- the drain timeout


def test_the_drain_timeout_bounds_a_request_that_outlasts_it(tmp_path: Path) -> None:
    stack = Stack(tmp_path, env=stack_env(tmp_path, DRAIN_TIMEOUT=str(SHORT_DRAIN))).start(workers=1)
    try:
        register(stack, "long", min_replicas=1)
        ready_replicas(stack, "long", 1)
        long_tokens = 150  # 15 s: far beyond the drain timeout
        out: list[Result] = []
        thread = threading.Thread(
            target=lambda: out.append(send(httpx.Client(timeout=60), stack.router.url, "long", True, long_tokens))
        )
        thread.start()
        wait_until(lambda: engines_of(stack, "long"), 10, what="its engine")
        time.sleep(1.0)
        deleted_at = time.time()
        assert httpx.delete(f"{stack.router.url}/v1/models/long", timeout=10).status_code in (200, 204)
        thread.join(60)
        assert not thread.is_alive(), "the request hung"
        (result,) = out
        (exit_event,) = engine_events(stack, "exit", "long")
        # Cut at the timeout, not before and not long after (the engine's stop takes a moment).
        assert exit_event["running"] == 1
        assert SHORT_DRAIN - 0.5 <= exit_event["t"] - deleted_at < SHORT_DRAIN + 3
        assert result.status == 200 and not result.whole and result.tokens < long_tokens
        assert SHORT_DRAIN - 0.5 <= result.end - deleted_at < SHORT_DRAIN + 5
        record_figures(
            "drain_timeout",
            {
                "drain_timeout_s": SHORT_DRAIN,
                "request_s": long_tokens * TOKEN_MS / 1000,
                "engine_stopped_after_s": round(exit_event["t"] - deleted_at, 1),
                "request_ended_after_s": round(result.end - deleted_at, 1),
                "tokens_received": result.tokens,
                "stream_ended_with": result.error[:80] if result.error else "no error event",
            },
        )
    finally:
        stack.stop()


# --------------------------------------------------------------------------- eviction on a GPU


def test_eviction_drains_and_the_new_engine_starts_once_the_gpu_is_free(tmp_path: Path) -> None:
    """One GPU (the worker double of tests/gpu_worker.py): model `a` runs there, a request in flight on it that no
    router counts (sent to the worker directly, so `a` looks idle and may be evicted); model `b` needs the GPU's
    memory. `a` is evicted and drains: its request finishes; `b`'s engine starts only after `a`'s has exited."""
    stack = Stack(tmp_path, env=stack_env(tmp_path))
    port = free_port()
    args = ["--worker-id", "g1", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url]
    stack.workers["g1"] = GPUWorkerDouble("g1", args, port, stack.env, tmp_path)
    try:
        stack.manager.start()
        stack.router.start()
        stack.workers["g1"].start()
        register(stack, "a", gpu_memory_utilization=0.6)
        (replica,) = ready_replicas(stack, "a", 1)
        out: list[Result] = []

        def direct() -> None:
            with httpx.Client(timeout=60, headers={"x-svllm-replica": replica["replica_id"]}) as client:
                out.append(send(client, stack.workers["g1"].url, "a", True))

        thread = threading.Thread(target=direct)
        thread.start()
        time.sleep(1.0)  # the request is under way (4 s)
        evicted_at = time.time()
        register(stack, "b", gpu_memory_utilization=0.6)  # preload: placed at once, in `a`'s room
        thread.join(60)
        ready_replicas(stack, "b", 1, timeout=DRAIN_TIMEOUT)
        (result,) = out
        (a_exit,) = engine_events(stack, "exit", "a")
        (b_start,) = engine_events(stack, "start", "b")
        assert result.whole, result
        assert a_exit["running"] == 0 and a_exit["t"] >= result.end - 0.5
        assert b_start["t"] > a_exit["t"]  # the new engine started once the old one had exited
        assert stack.model("a")["replicas"] == []
        record_figures(
            "eviction_gpu",
            {
                "evicted_engine_stopped_after_s": round(a_exit["t"] - evicted_at, 1),
                "new_engine_started_after_old_exit_s": round(b_start["t"] - a_exit["t"], 2),
                "request_on_evicted_engine": "completed" if result.whole else "cut",
            },
        )
    finally:
        stack.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
