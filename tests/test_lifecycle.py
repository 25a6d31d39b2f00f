"""The serverless lifecycle end to end, with real CPU vLLM engines on the tiny model: cold start on demand with
requests held at the router, scale to zero, 503s only for a full queue or an expired cold start, autoscaling
to a second worker and back, and failover when a worker is killed.

Each worker has one engine slot, so a second replica must go to the other worker. Tests run in file order
on one shared stack.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .harness import Service, Stack, alive, engine_processes, free_port, wait_until

ALIAS = "lazy"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Stack:
    # The worker's default fork server (the harness turns it off elsewhere): its models start again and again.
    env = {"CPU_SLOTS": "1", "SCALE_DOWN_DELAY": "2", "ENGINE_FORK_SERVER": "1"}
    s = Stack(tmp_path_factory.mktemp("lifecycle"), env=env).start(workers=2)
    resp = s.post(
        "/v1/models/register",
        json={
            "alias": ALIAS,
            "model_name": str(tiny_model),
            "max_model_len": 512,
            "preload": False,
            "idle_timeout_s": 6,
            "max_replicas": 2,
            "target_concurrency": 8,
        },
    )
    assert resp.status_code == 200, resp.text
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict_router(stack: Stack) -> Service:
    """A second router on the same manager with a tiny queue and a short cold-start timeout."""
    port = free_port()
    router = Service(
        "router-strict",
        ["router", "--host", "127.0.0.1", "--port", str(port), "--manager-url", stack.manager.url],
        port,
        {**stack.env, "MAX_QUEUE_PER_MODEL": "2", "COLD_START_TIMEOUT": "2"},
        stack.tmp,
    )
    router.start()
    yield router
    router.stop()


def complete(url: str, max_tokens: int = 4, timeout: float = 300) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": ALIAS, "prompt": "Once upon a time", "max_tokens": max_tokens},
        timeout=timeout,
    )


def engines_running(stack: Stack) -> int:
    return sum(len(w["engines"]) for w in stack.workers_by_id().values() if w["state"] == "healthy")


def engine_logs(stack: Stack) -> list[Path]:
    return sorted((stack.tmp / "state" / "engines").glob("*.log"))


def test_registered_model_at_zero_replicas_is_cold(stack: Stack) -> None:
    info = stack.model(ALIAS)
    assert info["state"] == "cold" and info["replicas"] == []
    assert info["policy"] == {
        "min_replicas": 0,
        "max_replicas": 2,
        "idle_timeout_s": 6.0,
        "target_concurrency": 8.0,
        "preload": False,
        "routing": "session",  # the default: session keys pin, others go to the less loaded of two
    }
    # Unregistered: 404 at once. Registered at zero replicas: listed, and requests wait (next test).
    resp = stack.post("/v1/completions", json={"model": "never-registered", "prompt": "x"})
    assert resp.status_code == 404
    assert ALIAS in [m.id for m in stack.openai().models.list().data]


def test_concurrent_requests_share_one_cold_start(stack: Stack) -> None:
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: complete(stack.router.url), range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    info = stack.model(ALIAS)
    assert info["state"] == "ready" and len(info["replicas"]) == 1
    assert engines_running(stack) == 1
    assert len(engine_logs(stack)) == 1  # one engine was ever started, not five


def test_idle_model_scales_to_zero(stack: Stack) -> None:
    replica = stack.model(ALIAS)["replicas"][0]
    worker = stack.workers[replica["worker_id"]]
    engines = engine_processes(worker.proc.pid)
    assert engines
    stack.wait_model(ALIAS, "cold", timeout=60)
    # Out of routing at once; listed as stopping until its worker has stopped the engine (draining).
    wait_until(lambda: stack.model(ALIAS)["replicas"] == [], 60, what="the drained replica gone")
    wait_until(lambda: not any(alive(p) for p in engines), 60, what="idle engine process to exit")
    wait_until(lambda: engines_running(stack) == 0, 30, what="workers to report no engine")


def test_queue_full_and_cold_start_timeout_are_503_with_retry_after(stack: Stack, strict_router: Service) -> None:
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: complete(strict_router.url), range(6)))
    codes = {r.json()["error"]["code"] for r in responses}
    assert {r.status_code for r in responses} == {503}
    assert codes == {"queue_full", "cold_start_timeout"}
    assert all(int(r.headers["retry-after"]) > 0 for r in responses)
    # The waiting requests asked for the model, so it is loading now and serves the patient router.
    assert complete(stack.router.url).status_code == 200


def test_load_beyond_target_adds_a_replica_on_the_other_worker_then_removes_it(stack: Stack) -> None:
    resp = httpx.patch(f"{stack.router.url}/v1/models/{ALIAS}", json={"target_concurrency": 1}, timeout=10)
    assert resp.status_code == 200 and resp.json()["policy"]["target_concurrency"] == 1
    bad = httpx.patch(f"{stack.router.url}/v1/models/{ALIAS}", json={"min_replicas": 5}, timeout=10)
    assert bad.status_code == 400  # above max_replicas
    first_worker = stack.model(ALIAS)["replicas"][0]["worker_id"]
    stop_at = time.monotonic() + 240

    def load(_: int) -> int:
        # Keep several requests in flight until the second replica is ready (or time runs out).
        codes = []
        while time.monotonic() < stop_at and len(ready_replicas()) < 2:
            codes.append(complete(stack.router.url, max_tokens=64).status_code)
        return codes.count(200) - len(codes)

    def ready_replicas() -> list[dict]:
        return [r for r in stack.model(ALIAS)["replicas"] if r["state"] == "ready"]

    with ThreadPoolExecutor(4) as pool:
        failures = list(pool.map(load, range(4)))
    assert failures == [0] * 4
    replicas = ready_replicas()
    assert len(replicas) == 2, stack.model(ALIAS)
    assert {r["worker_id"] for r in replicas} == {"w1", "w2"}
    assert first_worker in {r["worker_id"] for r in replicas}
    # Load gone: back to one replica (hysteresis delay), then to zero when idle.
    wait_until(lambda: len(stack.model(ALIAS)["replicas"]) == 1, 60, what="scale down to one replica")


def test_killed_worker_fails_over_without_failed_requests(stack: Stack) -> None:
    assert complete(stack.router.url).status_code == 200
    replica = stack.model(ALIAS)["replicas"][0]
    victim = stack.workers[replica["worker_id"]]
    results: list[int] = []

    def traffic() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            results.append(complete(stack.router.url).status_code)
            info = stack.model(ALIAS)
            if (
                info["state"] == "ready"
                and all(r["worker_id"] != victim.name for r in info["replicas"])
                and len(results) > 3
            ):
                return

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(traffic)
        time.sleep(1.0)
        victim.kill()
        running.result()
    assert results and set(results) == {200}, results
    info = stack.model(ALIAS)
    assert [r["worker_id"] for r in info["replicas"]] != [victim.name]
