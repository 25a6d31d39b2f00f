"""Faults injected into a running stack under client traffic: real manager, router and two workers, each with a
real CPU vLLM engine serving one model (min_replicas 2), credentials on.

Faults, in order: kill -9 a worker while it streams; kill -9 an engine's API server; SIGSTOP an engine's API server
(wedged: the worker's health probe kills and restarts it); SIGSTOP a worker (its heartbeats stop, its sockets hang)
and SIGCONT it later; kill -9 and restart the manager; kill -9 and restart
the router. For each: every request ends with a complete answer or a clean error within its timeout (no hang,
no stream cut without an error event), registrations survive, the system returns to full health by itself,
no engine process is left behind; the router's memory is sampled from /proc across the run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverless_vllm.worker.guard import group_members

from .harness import alive, metric_sum, wait_until
from .harness import session_for as harness_session_for
from .secure_harness import API_KEY, Observations, SecureStack, bearer, living, rss_kib

ALIAS = "tiny"
CLIENT_TIMEOUT_S = 45.0
ENGINE_START_S = 480  # an engine restart on a loaded 2-core machine (about 30 s when it is idle)
THINK_S = 0.25
# The router's read timeout towards a worker: bounds requests stuck on a frozen worker (answered elsewhere within the
# client's timeout), and lets a whole answer of WholeRequest.MAX_TOKENS be silent that long on a loaded machine.
REQUEST_TIMEOUT_S = 30
# Codes of clean errors a client may see while a fault is in progress (all documented, OpenAI-shaped).
CLEAN_CODES = {
    "upstream_error",
    "stream_interrupted",
    "replica_unavailable",
    "model_failed",
    "cold_start_timeout",
    "overloaded",
    "manager_unavailable",
}


@dataclass
class Outcome:
    phase: str
    kind: str  # ok | http_error | stream_error | refused | reset | timeout | truncated | unclean | crashed
    code: str | None
    seconds: float
    stream: bool = False


class Traffic:
    """Client threads sending chat (streamed) and completion (whole) requests back to back, each recorded."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url, self.clients = url, clients
        self.phase = "warm-up"
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> Traffic:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread hangs"

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(CLIENT_TIMEOUT_S, connect=5), headers=bearer(API_KEY)) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                phase, start, stream = self.phase, time.monotonic(), (n + index) % 2 == 0
                try:
                    kind, code = one_request(client, self.url, stream=stream)
                except Exception as exc:  # recorded, so the phase fails, instead of a thread that dies unseen
                    kind, code = "crashed", repr(exc)[:200]
                # A failure belongs to the phase it ended in (the fault that caused it), an answer to its start.
                with self._lock:
                    self.outcomes.append(
                        Outcome(phase if kind == "ok" else self.phase, kind, code, time.monotonic() - start, stream)
                    )
                # Think time: steady traffic that leaves CPU to engines restarting on this small machine.
                time.sleep(THINK_S if kind == "ok" else 0.5)

    def summary(self, phase: str) -> dict[str, Any]:
        mine = [o for o in self.outcomes if o.phase == phase]
        kinds = Counter(o.kind for o in mine)
        codes = Counter(o.code for o in mine if o.code)
        return {
            "requests": len(mine),
            "kinds": dict(kinds),
            # Whole (not streamed) requests that failed: one whose replica died before answering is retried.
            "whole_failed": [f"{o.kind} {o.code}" for o in mine if not o.stream and o.kind != "ok"],
            "error_codes": dict(codes),
            "max_seconds": round(max((o.seconds for o in mine), default=0.0), 2),
        }


def one_request(
    client: httpx.Client, url: str, stream: bool, max_tokens: int = 16, headers: dict[str, str] | None = None
) -> tuple[str, str | None]:
    """One request, classified: ok, a clean error (with its code), or a failure mode (hang, cut, unclean)."""
    try:
        if stream:
            body = {
                "model": ALIAS,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": max_tokens,
                "stream": True,
                "ignore_eos": True,
            }
            with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    resp.read()
                    return classify_error(resp)
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        return "ok", None
                    if line.startswith("data:") and '"error"' in line:
                        err = json.loads(line[5:])["error"]
                        return "stream_error", err.get("code")
                return "truncated", None
        resp = client.post(
            f"{url}/v1/completions",
            json={"model": ALIAS, "prompt": "Once upon a time", "max_tokens": max_tokens},
            headers=headers,
        )
        if resp.status_code == 200 and resp.json()["choices"]:
            return "ok", None
        return classify_error(resp)
    except httpx.TimeoutException:
        return "timeout", None
    except httpx.ConnectError:
        return "refused", None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        return "reset", None


def classify_error(resp: httpx.Response) -> tuple[str, str | None]:
    try:
        err = resp.json()["error"]
        assert err["message"] and err["type"]
    except Exception:
        return "unclean", f"{resp.status_code} {resp.text[:100]}"
    return "http_error", err.get("code") or str(resp.status_code)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def obs() -> Iterator[Observations]:
    o = Observations("faults")
    yield o
    o.write()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SecureStack]:
    s = SecureStack(
        tmp_path_factory.mktemp("faults"),
        env={
            "CPU_SLOTS": "1",
            "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
            "FAILED_RETRY_AFTER": "3",
            "COLD_START_TIMEOUT": "30",
            # The worker's default (the harness turns it off elsewhere): each engine killed here restarts forked.
            "ENGINE_FORK_SERVER": "1",
            # A wedged engine (SIGSTOP) is killed after 3 health probes in a row failed, 5 s each: fast enough for
            # the test, slow enough that a loaded machine's slow answers are not taken for a wedge.
            "ENGINE_LIVENESS_INTERVAL": "1",
            "ENGINE_LIVENESS_TIMEOUT": "5",
            "ENGINE_LIVENESS_FAILURES": "3",
            # The faults here cut streams (the clean cut is what they check): migration, which continues them
            # on the other replica, is tested in tests/test_stream_migration.py.
            "STREAM_MIGRATION": "0",
        },
    ).start(workers=2)
    try:
        # A long context so a stream can outlast the fault it is cut by (see LongStream).
        s.register(ALIAS, tiny_model, max_model_len=2048, min_replicas=2, max_replicas=2)
        wait_until(lambda: full_health(s), ENGINE_START_S, interval=1, what="two ready replicas")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def engines_seen() -> set[int]:
    """Every engine process (API server and its group) seen during the module; all must be gone at the end."""
    return set()


@pytest.fixture(scope="module")
def traffic(stack: SecureStack, engines_seen: set[int], obs: Observations) -> Iterator[Traffic]:
    t = Traffic(stack.router.url).start()
    yield t
    t.stop()
    obs.record("phases", {phase: t.summary(phase) for phase in dict.fromkeys(o.phase for o in t.outcomes)})
    stack.stop()
    wait_until(lambda: not living(engines_seen), 60, what="every engine process to exit")
    obs.record("engine_processes_seen", len(engines_seen))
    obs.record("engine_processes_left", len(living(engines_seen)))


# ------------------------------------------------------------------------------------------ helpers


def ready_replicas(stack: SecureStack) -> dict[str, dict[str, Any]]:
    return {r["worker_id"]: r for r in stack.model(ALIAS)["replicas"] if r["state"] == "ready"}


def full_health(stack: SecureStack) -> bool:
    workers = stack.workers_by_id()
    return (
        set(ready_replicas(stack)) == {"w1", "w2"}
        and all(workers[w]["state"] == "healthy" for w in ("w1", "w2"))
        and stack.get("/v1/models").json()["data"][0]["state"] == "ready"
    )


def engine_group(stack: SecureStack, worker: str) -> set[int]:
    pid = stack.engines(worker)[0]["pid"]
    return {pid, *group_members(pid)}


def session_for(stack: SecureStack, worker: str) -> str:
    return harness_session_for(stack, ALIAS, worker)


class LongStream(threading.Thread):
    """A long streamed completion pinned to one replica; records how it ended."""

    def __init__(self, url: str, session: str) -> None:
        super().__init__(daemon=True)
        self.url, self.session = url, session
        self.first_chunk = threading.Event()
        self.result: tuple[str, str | None] | None = None
        self.seconds = 0.0

    def run(self) -> None:
        # Long enough to be still generating when the fault hits: a stream short enough to sit whole in the
        # relay's and the kernel's buffers by then would end complete, and the cut would go untested.
        body = {"model": ALIAS, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        start = time.monotonic()
        try:
            with (
                httpx.Client(timeout=CLIENT_TIMEOUT_S) as client,
                client.stream(
                    "POST",
                    f"{self.url}/v1/completions",
                    json=body,
                    headers={**bearer(API_KEY), "x-session-id": self.session},
                ) as resp,
            ):
                result: tuple[str, str | None] = ("truncated", None)
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        self.first_chunk.set()
                    if line == "data: [DONE]":
                        result = ("ok", None)
                        break
                    if line.startswith("data:") and '"error"' in line:
                        result = ("stream_error", json.loads(line[5:])["error"].get("code"))
                        break
        except httpx.TimeoutException:
            result = ("timeout", None)
        except httpx.HTTPError as exc:
            result = ("reset", type(exc).__name__)
        self.result, self.seconds = result, time.monotonic() - start
        self.first_chunk.set()


# The whole requests' prompt: long, so that its engine's prompt-token counter tells when they are running there
# (the traffic's prompts are a few tokens each).
WHOLE_PROMPT = " ".join(["Once upon a time the sea and its ships"] * 30)


class WholeRequest(threading.Thread):
    """A long completion answered whole, pinned to one replica: when that replica dies before answering, the router
    retries it on the other one, so it is answered whole all the same (what the clients are promised)."""

    # Still generating when the fault hits (the kill comes once the engine has begun them, see whole_requests_on;
    # one answered before it is sent again), and short enough for the retry to be answered within the router's read
    # timeout (REQUEST_TIMEOUT_S: a whole answer is silent until it is complete) while the victim's engine restarts
    # beside it: CI runs under load saw retries of 400 tokens (15 s timeout), 300 (30 s) and 128 (30 s, beside the
    # appliance's containers) time out, 502.
    MAX_TOKENS = 64

    def __init__(self, url: str, session: str) -> None:
        super().__init__(daemon=True)
        self.url, self.session = url, session
        self.result: tuple[int, int | str | None] | str | None = None  # (status, tokens or error code), or exception
        self.ended = 0.0  # time.monotonic() when the answer (or the error) came

    def run(self) -> None:
        body = {"model": ALIAS, "prompt": WHOLE_PROMPT, "max_tokens": self.MAX_TOKENS, "ignore_eos": True}
        try:
            resp = httpx.post(
                f"{self.url}/v1/completions",
                json=body,
                headers={**bearer(API_KEY), "x-session-id": self.session},
                timeout=CLIENT_TIMEOUT_S,
            )
            body = resp.json()
            if resp.status_code == 200:
                self.result = (200, body["usage"]["completion_tokens"])
            else:
                self.result = (resp.status_code, (body.get("error") or {}).get("code"))
        except Exception as exc:  # seen by the test, not lost with the thread
            self.result = repr(exc)
        self.ended = time.monotonic()


def whole_requests_on(stack: SecureStack, worker: str, n: int = 2) -> list[WholeRequest]:
    """`n` whole requests running on `worker`'s replica: sent, and begun by its engine (its prompt-token counter
    grew by their prompts: the traffic's few tokens cannot make up one of them), or at most 10 s after they were
    sent. A test that waited a fixed time saw them end before the kill on an idle machine and time out on a busy
    one; one that waited for the engine's count of requests saw the traffic's requests come and go in that count."""
    prompt = whole_prompt_tokens(stack)
    replica = stack.engines(worker)[0]["replica_id"]
    metrics = f"{stack.workers[worker].url}/engines/{replica}/metrics"

    def begun() -> float:  # prompt tokens the engine has begun
        return metric_sum(httpx.get(metrics, timeout=10).text, "vllm:prompt_tokens_total")

    before = begun()
    requests = [WholeRequest(stack.router.url, session_for(stack, worker)) for _ in range(n)]
    for r in requests:
        r.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and begun() < before + n * prompt:
        time.sleep(0.02)
    return requests


def stream_and_whole_requests_on(stack: SecureStack, worker: str) -> tuple[LongStream, list[WholeRequest]]:
    """A long stream and two whole requests, all running on `worker`'s replica, for a fault to hit. A stream that
    ended while the whole requests were being begun (a CI run under load saw it: the wait for them is up to 10 s),
    or a whole request already answered by then (another saw both answered 10-30 ms before the kill), would prove
    nothing about the fault; then what is running is let end and all three are sent again."""
    for _ in range(3):
        stream = LongStream(stack.router.url, session_for(stack, worker))
        stream.start()
        assert stream.first_chunk.wait(30)
        whole = whole_requests_on(stack, worker)
        if stream.is_alive() and all(r.result is None for r in whole):
            return stream, whole
        for r in [stream, *whole]:
            r.join(CLIENT_TIMEOUT_S + 5)
    raise AssertionError(f"the long stream or a whole request on {worker} ended before the fault could hit, 3 times")


def whole_prompt_tokens(stack: SecureStack) -> int:
    resp = httpx.post(
        f"{stack.router.url}/v1/completions",
        json={"model": ALIAS, "prompt": WHOLE_PROMPT, "max_tokens": 1},
        headers=bearer(API_KEY),
        timeout=CLIENT_TIMEOUT_S,
    )
    resp.raise_for_status()
    return int(resp.json()["usage"]["prompt_tokens"])


def check_retried(requests: list[WholeRequest], fault_at: float) -> None:
    """Each request was still unanswered when the fault hit (else it proves nothing) and was answered whole."""
    for r in requests:
        r.join(CLIENT_TIMEOUT_S + 5)
    assert [r.result for r in requests] == [(200, WholeRequest.MAX_TOKENS)] * len(requests)
    assert all(r.ended > fault_at for r in requests), [round(r.ended - fault_at, 2) for r in requests]


def check_phase(traffic: Traffic, phase: str, allow_transport_errors: bool = False) -> dict[str, Any]:
    """Every request ended cleanly; a whole request is answered (retried on the other replica when its own died
    before the first byte), unless the router itself was down (`allow_transport_errors`)."""
    summary = traffic.summary(phase)
    kinds = summary["kinds"]
    assert summary["requests"] > 0, summary
    assert not kinds.get("timeout") and not kinds.get("truncated") and not kinds.get("unclean"), summary
    assert not kinds.get("crashed"), summary
    if not allow_transport_errors:
        assert summary["whole_failed"] == [], summary
    if not allow_transport_errors:
        assert not kinds.get("refused") and not kinds.get("reset"), summary
    assert set(summary["error_codes"]) <= CLEAN_CODES, summary
    assert summary["max_seconds"] < CLIENT_TIMEOUT_S, summary
    return summary


def recovered_traffic(traffic: Traffic, phase: str, n: int = 6) -> None:
    """After recovery, the traffic is all answers again."""
    traffic.phase = f"{phase} (recovered)"
    wait_until(
        lambda: sum(1 for o in traffic.outcomes if o.phase == traffic.phase) >= n, 120, what="traffic after recovery"
    )
    tail = [o.kind for o in traffic.outcomes if o.phase == traffic.phase]
    assert set(tail) == {"ok"}, tail


def sample_router_rss(stack: SecureStack, obs: Observations, label: str) -> int:
    assert stack.router.proc is not None
    rss = rss_kib(stack.router.proc.pid)
    obs.data.setdefault("router_rss_kib", []).append((label, rss))
    return rss


# ------------------------------------------------------------------------------------------ the faults


def test_warm_up_and_baseline(stack: SecureStack, traffic: Traffic, engines_seen: set[int], obs: Observations) -> None:
    for w in ("w1", "w2"):
        engines_seen |= engine_group(stack, w)
    wait_until(lambda: len(traffic.outcomes) >= 24, 120, what="warm-up traffic")
    check_phase(traffic, "warm-up")
    assert set(traffic.summary("warm-up")["kinds"]) == {"ok"}
    obs.record("registration", stack.model(ALIAS)["engine"])
    sample_router_rss(stack, obs, "baseline after warm-up")


def test_kill_9_worker_while_streaming(
    stack: SecureStack, traffic: Traffic, engines_seen: set[int], obs: Observations
) -> None:
    phase = traffic.phase = "kill -9 worker while streaming"
    victim = stack.workers["w1"]
    engine = engine_group(stack, "w1")
    stream, whole = stream_and_whole_requests_on(stack, "w1")
    started = time.monotonic()
    victim.kill()
    stream.join(CLIENT_TIMEOUT_S + 5)
    assert stream.result is not None and stream.result[0] == "stream_error", stream.result  # clean end, no hang
    wait_until(lambda: not living(engine), 30, what="the dead worker's engine processes to exit")
    orphans_gone = time.monotonic() - started
    wait_until(lambda: stack.workers_by_id()["w1"]["state"] == "dead", 30, what="w1 declared dead")
    # The survivor serves everything meanwhile (the traffic keeps getting answers).
    time.sleep(3)
    victim.start()  # the worker comes back (a supervisor would restart it)
    wait_until(lambda: full_health(stack), ENGINE_START_S, interval=1, what="full health after the worker restart")
    recovery = time.monotonic() - started
    check_retried(whole, started)  # nothing of them had been sent: answered whole by the survivor
    engines_seen |= engine_group(stack, "w1")
    summary = check_phase(traffic, phase)
    recovered_traffic(traffic, phase)
    obs.record(
        phase,
        {
            "cut_stream": stream.result,
            "cut_stream_seconds": round(stream.seconds, 2),
            "whole_answered_after_s": [round(r.ended - started, 1) for r in whole],
            "engine_processes_gone_after_s": round(orphans_gone, 1),
            "full_health_after_s": round(recovery, 1),
            "traffic": summary,
        },
    )


def test_kill_9_engine_process(stack: SecureStack, traffic: Traffic, engines_seen: set[int], obs: Observations) -> None:
    phase = traffic.phase = "kill -9 engine API server"
    before = stack.engines("w2")[0]
    old_group = engine_group(stack, "w2")
    stream, whole = stream_and_whole_requests_on(stack, "w2")
    started = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    stream.join(CLIENT_TIMEOUT_S + 5)
    assert stream.result is not None and stream.result[0] == "stream_error", stream.result
    wait_until(lambda: not living(old_group), 30, what="the killed engine's EngineCore and workers to exit")
    orphans_gone = time.monotonic() - started
    wait_until(
        lambda: full_health(stack) and stack.engines("w2")[0]["pid"] != before["pid"],
        ENGINE_START_S,
        interval=1,
        what="the engine restarted by its worker",
    )
    recovery = time.monotonic() - started
    after = stack.engines("w2")[0]
    assert after["replica_id"] == before["replica_id"] and after["restarts"] == before["restarts"] + 1
    check_retried(whole, started)  # the dying engine's whole requests, answered by the other replica
    engines_seen |= engine_group(stack, "w2")
    summary = check_phase(traffic, phase)
    recovered_traffic(traffic, phase)
    obs.record(
        phase,
        {
            "cut_stream": stream.result,
            "engine_processes_gone_after_s": round(orphans_gone, 1),
            "restarted_same_replica": True,
            "whole_answered_after_s": [round(r.ended - started, 1) for r in whole],
            "full_health_after_s": round(recovery, 1),
            "traffic": summary,
        },
    )


def test_wedged_engine_is_killed_and_restarted(
    stack: SecureStack, traffic: Traffic, engines_seen: set[int], obs: Observations
) -> None:
    """An engine alive but answering nothing (its API server stopped: as a deadlock looks from outside) is found
    by the worker's health probe, killed and restarted; without the probe it would hold its replica forever."""
    phase = traffic.phase = "SIGSTOP engine API server (wedged)"
    before = stack.engines("w2")[0]
    old_group = engine_group(stack, "w2")
    started = time.monotonic()
    os.kill(before["pid"], signal.SIGSTOP)
    wait_until(lambda: not alive(before["pid"]), 120, what="the wedged engine to be killed by its worker")
    killed_after = time.monotonic() - started
    wait_until(lambda: not living(old_group), 30, what="the wedged engine's EngineCore and workers to exit")
    wait_until(
        lambda: full_health(stack) and stack.engines("w2")[0]["pid"] != before["pid"],
        ENGINE_START_S,
        interval=1,
        what="the engine restarted by its worker",
    )
    recovery = time.monotonic() - started
    after = stack.engines("w2")[0]
    assert after["replica_id"] == before["replica_id"] and after["restarts"] == before["restarts"] + 1
    assert "engine stopped answering its health probe (3 in a row" in stack.all_logs()
    engines_seen |= engine_group(stack, "w2")
    summary = check_phase(traffic, phase)
    recovered_traffic(traffic, phase)
    obs.record(
        phase,
        {"killed_after_s": round(killed_after, 1), "full_health_after_s": round(recovery, 1), "traffic": summary},
    )


def test_sigstop_worker_then_resume(stack: SecureStack, traffic: Traffic, obs: Observations) -> None:
    phase = traffic.phase = "SIGSTOP worker until declared dead, then SIGCONT"
    frozen = stack.workers["w1"]
    engine_pid = stack.engines("w1")[0]["pid"]
    started = time.monotonic()
    frozen.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: stack.workers_by_id()["w1"]["state"] != "healthy", 15, what="w1 out of routing")
        out_of_routing = time.monotonic() - started
        # Frozen long enough for the manager to give its replica up (the worker's sockets hang meanwhile).
        wait_until(lambda: stack.workers_by_id()["w1"]["state"] == "dead", 30, what="w1 declared dead")
        dead_after = time.monotonic() - started
        time.sleep(2)
        frozen_for = time.monotonic() - started
    finally:
        frozen.signal(signal.SIGCONT)
    wait_until(lambda: full_health(stack), 120, interval=0.5, what="full health after SIGCONT")
    recovery = time.monotonic() - started
    # Its engine kept running and was taken back, not restarted.
    assert stack.engines("w1")[0]["pid"] == engine_pid and alive(engine_pid)
    summary = check_phase(traffic, phase)
    recovered_traffic(traffic, phase)
    obs.record(
        phase,
        {
            "out_of_routing_after_s": round(out_of_routing, 1),
            "dead_after_s": round(dead_after, 1),
            "frozen_for_s": round(frozen_for, 1),
            "same_engine_process_taken_back": True,
            "full_health_after_s": round(recovery, 1),
            "traffic": summary,
        },
    )


def test_manager_restart_under_traffic(stack: SecureStack, traffic: Traffic, obs: Observations) -> None:
    phase = traffic.phase = "kill -9 and restart the manager"
    replicas = {r["replica_id"] for r in stack.model(ALIAS)["replicas"]}
    spec = stack.model(ALIAS)["engine"]
    started = time.monotonic()
    stack.manager.signal(signal.SIGKILL)
    stack.manager.proc.wait(10)
    time.sleep(3)  # the router serves from its table meanwhile
    stack.manager.start()
    wait_until(lambda: full_health(stack), 120, interval=0.5, what="full health after the manager restart")
    recovery = time.monotonic() - started
    info = stack.model(ALIAS)
    assert info["engine"] == spec and {r["replica_id"] for r in info["replicas"]} == replicas  # survived, adopted
    summary = check_phase(traffic, phase)
    assert set(summary["kinds"]) == {"ok"}, summary  # a ready model does not need the manager
    recovered_traffic(traffic, phase)
    sample_router_rss(stack, obs, "after worker, engine, SIGSTOP and manager faults")
    obs.record(
        phase,
        {
            "registrations_survived": True,
            "engines_adopted": True,
            "full_health_after_s": round(recovery, 1),
            "traffic": summary,
        },
    )


def test_router_restart_under_traffic(stack: SecureStack, traffic: Traffic, obs: Observations) -> None:
    phase = traffic.phase = "kill -9 and restart the router"
    started = time.monotonic()
    stack.router.kill()
    time.sleep(2)
    stack.router.start()
    wait_until(lambda: full_health(stack), 60, interval=0.5, what="the router back")
    recovery = time.monotonic() - started
    summary = check_phase(traffic, phase, allow_transport_errors=True)  # refused/reset while it is down
    recovered_traffic(traffic, phase)
    # Requests cut by the router's death were aborted in the engines, none left running for nobody.
    for w in ("w1", "w2"):
        replica = stack.engines(w)[0]["replica_id"]
        wait_until(
            lambda r=replica, w=w: (
                "vllm:num_requests_running"
                in (text := httpx.get(f"{stack.workers[w].url}/engines/{r}/metrics", timeout=10).text)
                and metric_sum(text, "vllm:num_requests_running") <= traffic.clients
            ),
            30,
            what="engines not busy for clients that are gone",
        )
    obs.record(phase, {"full_health_after_s": round(recovery, 1), "traffic": summary})


def test_router_memory_is_flat(stack: SecureStack, traffic: Traffic, obs: Observations) -> None:
    """RSS of the router across the faults (same process) and of the restarted router after as much traffic."""
    samples = dict(obs.data["router_rss_kib"])
    base = samples["baseline after warm-up"]
    after = samples["after worker, engine, SIGSTOP and manager faults"]
    requests = len(traffic.outcomes)
    obs.record("router_rss_growth_kib", after - base)
    obs.record("requests_total", requests)
    assert after - base < 24 * 1024, samples  # < 24 MiB over the run: no per-request leak
    phase = traffic.phase
    wait_until(lambda: sum(1 for o in traffic.outcomes if o.phase == phase) >= 30, 180, what="more traffic")
    sample_router_rss(stack, obs, "restarted router after 30 requests")
