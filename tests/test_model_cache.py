"""The model cache end to end: manager, router and one worker as real processes; the worker's Hugging Face cache is a
folder of the test's own and its hub the stand-in on loopback (tests/hub_double.py, through HF_ENDPOINT), never the
internet. A hub model registered at zero replicas is prefetched to the worker, with its progress in
`GET /v1/models/{alias}` and the metrics; bad sources (a missing repository, a wrong revision, a model bigger than
the disk) fail their models with a clear `last_error`, which a client asking for them is told; and the cold start
of the prefetched model, a real CPU vLLM engine loading `testorg/tiny` by its hub id, takes every file from the
cache: the stand-in sends none during the start. Then the hub goes away (nothing listens at its address): the
worker's probe finds it down, and that engine, killed, restarts offline; a model whole in the worker's cache but
registered during the outage starts offline too; once the hub is back, a hub LoRA adapter is prefetched and loads
into that offline engine (the worker hands it the cache's folder: worker/adapter_fetch.py).

The tests share one stack and run in file order; the last four start engines or load into them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverless_vllm.testing.tiny_lora import make_tiny_lora
from serverless_vllm.worker.engine_log import LAUNCH_HEADER

from .harness import Stack, metric_sum, wait_until
from .hub_double import HubDouble

TINY, HUGE, COPY, LORA = "testorg/tiny", "testorg/huge", "testorg/copy", "testorg/lora"


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tmp_path_factory.mktemp("adapters") / "lora", seed=1)


@pytest.fixture(scope="module")
def hub(tiny_model: Path, lora: Path) -> Iterator[HubDouble]:
    repos = {TINY: tiny_model, HUGE: tiny_model, COPY: tiny_model, LORA: lora}
    double = HubDouble(repos, claimed_sizes={(HUGE, "model.safetensors"): 2**50})
    yield double.start()
    double.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, hub: HubDouble) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("model-cache")
    env = {
        "CPU_SLOTS": "1",
        "ENGINE_FORK_SERVER": "1",  # the worker's default: an offline start must not be forked from it (online)
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "0",  # the harness's default is 1: no hub on these machines, but this one is ours
        "HUB_PROBE_INTERVAL": "0.5",
    }
    s = Stack(tmp, env=env).start(workers=1)
    try:
        yield s
    finally:
        s.stop()


def register(stack: Stack, alias: str, model: str, **kw: Any) -> None:
    # float32: the CPU build's bf16 kernels once crashed on a short first request (../shared/ENVIRONMENT.md).
    body = {"alias": alias, "model_name": model, "max_model_len": 512, "dtype": "float32", "preload": False, **kw}
    resp = stack.post("/v1/models/register", json=body)
    assert resp.status_code == 200, resp.text


def test_a_registered_hub_model_is_prefetched_with_progress(stack: Stack, hub: HubDouble, tiny_model: Path) -> None:
    hub.chunk_delay_s = 0.3  # about 4 s for the weights: the progress shows on the way
    register(stack, "tiny", TINY)
    seen = []

    def cached() -> bool:
        info = stack.model("tiny")
        seen.append(info["cache"].get("w1"))
        return info["state"] == "cold" and info["cache"].get("w1", {}).get("state") == "cached"

    wait_until(cached, 120, interval=0.2, what="tiny cached on w1")
    hub.chunk_delay_s = 0.0
    total = sum(f.stat().st_size for f in tiny_model.iterdir() if f.is_file() and not f.name.startswith("."))
    assert seen[-1] == {"state": "cached", "bytes": total, "total": total, "error": None}
    assert any(s and s["state"] == "fetching" and 0 < s["bytes"] < total for s in seen), seen
    snapshot = HubDouble.snapshot(Path(stack.env["HF_HOME"]), TINY)
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    manager = httpx.get(f"{stack.manager.url}/metrics").text
    assert 'svllm_model_cache_state{model="tiny",worker="w1",state="cached"} 1.0' in manager
    assert f'svllm_model_cache_bytes{{model="tiny",worker="w1"}} {float(total)}' in manager
    worker = httpx.get(f"{stack.workers['w1'].url}/metrics").text
    assert 'svllm_worker_prefetches_total{model="testorg/tiny",result="cached"} 1.0' in worker


def test_bad_sources_fail_their_models_clearly(stack: Stack, hub: HubDouble) -> None:
    register(stack, "missing", "testorg/missing")
    register(stack, "wrong-revision", TINY, revision="nope")
    register(stack, "huge", HUGE)
    expected = {
        "missing": f"worker w1 cannot cache testorg/missing: repository 'testorg/missing' not found on {hub.url}",
        "wrong-revision": f"worker w1 cannot cache testorg/tiny@nope: revision 'nope' not found in repository "
        f"'testorg/tiny' on {hub.url}",
        "huge": "worker w1 cannot cache testorg/huge: not enough disk space on this worker for 'testorg/huge'",
    }
    for alias, error in expected.items():
        info = stack.wait_model(alias, "failed", timeout=120)
        assert info["last_error"].startswith(error), info["last_error"]
        assert info["cache"]["w1"]["state"] == "failed"
    # A client asking for one of them is told why at once, not after an engine start.
    start = time.monotonic()
    resp = stack.post("/v1/completions", json={"model": "missing", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 503 and expected["missing"] in resp.json()["error"]["message"]
    assert time.monotonic() - start < 10
    for alias in expected:  # their prefetch orders go with them
        assert httpx.delete(f"{stack.router.url}/v1/models/{alias}", timeout=30).status_code == 200


def test_a_cold_start_takes_the_prefetched_files_from_the_cache(stack: Stack, hub: HubDouble) -> None:
    assert stack.model("tiny")["cache"]["w1"]["state"] == "cached"
    mark = len(hub.requests)
    client = stack.openai(timeout=600)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert stack.model("tiny")["state"] == "ready"
    # The engine loaded `testorg/tiny` by its hub id through the same cache: it asked the stand-in about it (its
    # files were current), but downloaded none of them.
    assert any(TINY in path for _, path in hub.requests[mark:]), hub.requests[mark:]
    assert hub.downloads(mark) == [], hub.downloads(mark)


def hub_up(stack: Stack, hub: HubDouble) -> bool:
    """What the worker's last probe of the hub found (its svllm_worker_hub_up for the stand-in): up."""
    text = httpx.get(f"{stack.workers['w1'].url}/metrics", timeout=10).text
    assert f'svllm_worker_hub_up{{endpoint="{hub.url}"}}' in text  # probed already, and this hub
    return metric_sum(text, "svllm_worker_hub_up") == 1


def test_a_cached_model_restarts_offline_once_the_hub_stops_answering(stack: Stack, hub: HubDouble) -> None:
    """tiny was cached and started while the hub answered. The hub goes away: the worker's probe finds it down, and
    the engine, killed, restarts offline and serves. Restarted online, vLLM would retry the hub for each file and
    fail after about 107 s (the restart, and the cold start after a scale to zero, ask the same question)."""
    wait_until(lambda: hub_up(stack, hub), 30, what="the worker's probe to find the hub up")
    # For the next test: the copy reaches the worker's cache before the outage, by another way than its prefetch.
    worker_env = {**os.environ, **stack.env}
    fill = [sys.executable, "-c", f"import huggingface_hub as h; h.snapshot_download({COPY!r})"]
    subprocess.run(fill, env=worker_env, check=True, capture_output=True, timeout=120)
    hub.stop()
    wait_until(lambda: not hub_up(stack, hub), 30, what="the worker's probe to find the hub down")
    log = stack.workers["w1"].log_path
    server_ready = re.compile(r"fork server \(pid \d+\): ready")
    wait_until(lambda: server_ready.search(log.read_text()), 120, what="the fork server to be ready")  # online
    (engine,) = stack.workers_by_id()["w1"]["engines"]
    assert engine["alias"] == "tiny" and engine["state"] == "ready" and engine["restarts"] == 0, engine
    os.killpg(engine["pid"], signal.SIGKILL)  # the engine leads its own process group

    def restarted() -> bool:
        (now,) = stack.workers_by_id()["w1"]["engines"]
        assert now["state"] != "failed", now
        return now["restarts"] == 1 and now["state"] == "ready"

    wait_until(restarted, 300, what="tiny's engine to restart")
    # Not forked: the server's huggingface_hub read HF_HUB_OFFLINE=0 at import, and a child would keep it.
    assert f"engine {engine['replica_id']} starts plainly: its HF_HUB_OFFLINE" in log.read_text()
    client = stack.openai(timeout=60)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None


def test_with_the_hub_unreachable_a_model_in_the_cache_starts_offline(stack: Stack, hub: HubDouble) -> None:
    """A worker whose hub cannot be reached (a proxy or mirror down, no network) still starts a model its cache holds
    whole: its prefetch finds it there, and the engine starts with HF_HUB_OFFLINE (worker/hub_download.py). Started
    online, vLLM retries the hub for each file it looks up and fails after about 107 s, every file on disk. (The copy
    was put in the cache by the test before, while the hub answered.) Registered with `preload`: its engine is
    launched as the prefetch begins, and waits for the prefetch's check (Prefetcher.judged) to start offline."""
    assert httpx.delete(f"{stack.router.url}/v1/models/tiny", timeout=60).status_code == 200  # the one slot
    register(stack, "copy", COPY, enable_lora=True, max_loras=1, max_lora_rank=8, preload=True)  # (the next test's)
    client = stack.openai(timeout=600)
    reply = client.chat.completions.create(
        model="copy", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None
    copy = stack.model("copy")
    assert copy["state"] == "ready" and copy["cache"]["w1"]["state"] == "cached"
    (engine,) = stack.workers_by_id()["w1"]["engines"]
    assert engine["alias"] == "copy" and engine["restarts"] == 0, engine
    # One engine, launched once: offline from the first (online, vLLM fails after about 107 s, and the forked start
    # is tried again plainly, the check done by then: the answer would come, minutes late).
    logs = re.findall(rf": {re.escape(COPY)} as copy \(its log: ([^)\s]+)\)", stack.workers["w1"].log_path.read_text())
    assert len(logs) == 1, logs
    launches = Path(logs[0]).read_text().count(LAUNCH_HEADER)
    assert launches == 1, Path(logs[0]).read_text()[-3000:]


def test_a_hub_adapter_is_prefetched_and_loads_into_a_base_started_offline(
    stack: Stack, hub: HubDouble, lora: Path
) -> None:
    """copy's engine started offline during the outage (the test before): its huggingface_hub stays offline for its
    life. The hub answers again and an adapter is registered on copy by its hub id: it is prefetched where copy's
    files are (w1) before any request, and at its first request the worker hands the engine the snapshot's folder
    (left to fetch it itself, the offline engine refused a hub id: "No adapter found"). An adapter the hub lacks fails
    at its registration."""
    hub.resume()
    wait_until(lambda: hub_up(stack, hub), 30, what="the worker's probe to find the hub up again")
    mark = len(hub.requests)
    for alias, adapter in (("copy-lora", LORA), ("copy-nope", "testorg/nope")):
        body = {"alias": alias, "base": "copy", "adapter": adapter, "preload": False}  # loaded by a request
        resp = stack.post("/v1/models/register", json=body)
        assert resp.status_code == 200, resp.text
    wait_until(lambda: stack.model("copy-lora")["cache"]["w1"]["state"] == "cached", 60, what="the adapter prefetched")
    files = sorted(f.name for f in lora.iterdir() if f.is_file() and not f.name.startswith("."))
    assert sorted(hub.downloads(mark)) == [f"/{LORA}/resolve/{HubDouble.commit(LORA)}/{name}" for name in files]
    nope = stack.wait_model("copy-nope", "failed", timeout=60)
    assert nope["last_error"].startswith(
        f"worker w1 cannot cache testorg/nope: repository 'testorg/nope' not found on {hub.url}"
    ), nope
    mark = len(hub.requests)
    client = stack.openai(timeout=300)
    prompt = "Hello, how are you"
    base = client.completions.create(model="copy", prompt=prompt, max_tokens=8, temperature=0)
    tuned = client.completions.create(model="copy-lora", prompt=prompt, max_tokens=8, temperature=0)
    assert tuned.model == "copy-lora"
    assert tuned.choices[0].text != base.choices[0].text  # the adapter's weights change the output
    assert hub.downloads(mark) == []  # in the cache already
    assert [r["adapters"] for r in stack.model("copy")["replicas"]] == [["copy-lora"]]
    snapshot = HubDouble.snapshot(Path(stack.env["HF_HOME"]), LORA)
    assert f"loaded adapter copy-lora ({LORA}) from {snapshot}" in stack.workers["w1"].log_path.read_text()
    resp = stack.post("/v1/completions", json={"model": "copy-nope", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 503 and "repository 'testorg/nope' not found" in resp.json()["error"]["message"]
