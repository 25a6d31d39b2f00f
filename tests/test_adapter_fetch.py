"""Hub LoRA adapters fetched by the worker (worker/adapter_fetch.py) against the hub's stand-in on loopback
(tests/hub_double.py, through HF_ENDPOINT) and a Hugging Face cache of the test's own. huggingface_hub reads its
settings at import, as in the worker, so each case runs the fetcher in a fresh Python process with the worker's
environment (`fetch_in_child`). The engine's side (a base started offline loads a hub adapter) is in
tests/test_model_cache.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverless_vllm.testing.tiny_lora import make_tiny_lora

from .hub_double import HubDouble
from .test_prefetch import hub_env, model_files

LORA = "testorg/lora"

# Runs in the child: each (weights, hub_down) of argv[1] in turn, then argv[2] (if any) twice at once; prints what
# each gave, a folder or the error's sentence.
_CHILD = """
import asyncio, json, sys
from serverless_vllm.worker.adapter_fetch import AdapterFetcher, AdapterFetchError

async def one(weights, hub_down):
    try:
        return {"folder": await AdapterFetcher(hub_down=lambda: hub_down).folder(weights)}
    except AdapterFetchError as exc:
        return {"error": str(exc)}

async def main():
    out = [await one(w, d) for w, d in json.loads(sys.argv[1])]
    if len(sys.argv) > 2:
        shared = AdapterFetcher()
        out += [{"folder": f} for f in await asyncio.gather(*(shared.folder(sys.argv[2]) for _ in range(2)))]
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tmp_path_factory.mktemp("adapters") / "lora", seed=1)


@pytest.fixture
def hub(lora: Path) -> Iterator[HubDouble]:
    double = HubDouble({LORA: lora}).start()
    yield double
    double.stop()


def fetch_in_child(env: dict[str, str], cases: list[tuple[str, bool]], together: str | None = None) -> list[Any]:
    args = [sys.executable, "-c", _CHILD, json.dumps(cases), *([together] if together else [])]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: list[Any] = json.loads(done.stdout)
    return result


def test_a_hub_adapter_is_fetched_into_the_cache_and_a_folder_is_passed_as_it_is(
    hub: HubDouble, lora: Path, tmp_path: Path
) -> None:
    home = tmp_path / "hf"
    (got, local) = fetch_in_child(hub_env(hub, home), [(LORA, False), (str(lora), False)])
    assert got == {"folder": str(HubDouble.snapshot(home, LORA))}
    assert model_files(Path(got["folder"])) == model_files(lora)
    assert local == {"folder": str(lora)}  # a path: the engine reads it where it is
    files = sorted(model_files(lora))
    assert sorted(hub.downloads()) == [f"/{LORA}/resolve/{HubDouble.commit(LORA)}/{name}" for name in files]


def test_two_loads_of_one_adapter_at_once_share_its_fetch(hub: HubDouble, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    together = fetch_in_child(hub_env(hub, home), [], together=LORA)
    assert together == [{"folder": str(HubDouble.snapshot(home, LORA))}] * 2
    listings = [path for _, path in hub.requests if path == f"/api/models/{LORA}?blobs=true"]  # one per fetch
    assert len(listings) == 1, hub.requests


def test_with_the_hub_down_a_cached_adapter_is_taken_from_the_cache_and_a_missing_one_said_so(
    hub: HubDouble, tmp_path: Path
) -> None:
    home = tmp_path / "hf"
    env = hub_env(hub, home)
    fetch_in_child(env, [(LORA, False)])
    mark = len(hub.requests)
    # The watch finds the hub down: the cache alone, no request to the hub.
    (cached, missing) = fetch_in_child(env, [(LORA, True), ("testorg/other", True)])
    assert cached == {"folder": str(HubDouble.snapshot(home, LORA))}
    assert hub.requests[mark:] == []
    assert missing["error"].startswith(
        "'testorg/other' is not in this worker's Hugging Face cache, and the hub does not answer"
    ), missing
    # Nothing listens at the hub's address (the watch has not seen it yet): the cache too, after the refusal.
    hub.stop()
    (refused,) = fetch_in_child(env, [(LORA, False)])
    assert refused == {"folder": str(HubDouble.snapshot(home, LORA))}


def test_an_adapter_the_hub_lacks_fails_with_the_hubs_reason(hub: HubDouble, tmp_path: Path) -> None:
    (got,) = fetch_in_child(hub_env(hub, tmp_path / "hf"), [("testorg/missing", False)])
    assert got["error"].startswith(f"repository 'testorg/missing' not found on {hub.url}"), got
    assert not os.path.exists(tmp_path / "hf" / "hub" / "models--testorg--missing" / "snapshots")


# The worker stopping while a fetch is under way: its loop ends with the fetch's waiter cancelled.
_STOPPING = """
import asyncio, sys
from serverless_vllm.worker.adapter_fetch import AdapterFetcher

async def main():
    fetch = asyncio.ensure_future(AdapterFetcher().folder(sys.argv[1]))
    await asyncio.sleep(1.0)
    fetch.cancel()

asyncio.run(main())
"""


def test_a_fetch_under_way_does_not_hold_the_worker_when_it_stops(hub: HubDouble, tmp_path: Path) -> None:
    """A download cannot be stopped in the middle of a file, so the fetch runs in a daemon thread: a worker that stops
    meanwhile exits at once, where asyncio's default executor would keep its process until the download ended."""
    hub.answer_delay_s = 30.0  # the hub takes half a minute to answer
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _STOPPING, LORA], env=hub_env(hub, tmp_path / "hf"), capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 15, "the process waited for the fetch"
