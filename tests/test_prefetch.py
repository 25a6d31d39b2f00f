"""The worker's prefetcher (worker/prefetch.py and the download program worker/hub_download.py) against a stand-in
Hugging Face hub on loopback (tests/hub_double.py; the hub client honours HF_ENDPOINT), never the internet: the
download fills the cache the engines read, with progress on the way; bad sources (a missing repository, a wrong
revision, a disk too small) fail with a sentence that says which; an offline worker only checks its cache; a model
no longer asked for stops downloading. The manager's side is tests/unit/test_model_cache.py, and a real engine
started from a prefetched cache is tests/test_model_cache.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serverless_vllm.schemas import CacheFault, CacheState, CacheStatus, PrefetchOrder
from serverless_vllm.worker.hub_download import describe, ignore_patterns
from serverless_vllm.worker.hub_watch import HubWatch
from serverless_vllm.worker.prefetch import Prefetcher

from .harness import alive, free_port
from .hub_double import HubDouble
from .test_fork_server import eventually

TINY, HUGE = "testorg/tiny", "testorg/huge"


@pytest.fixture
def hub(tiny_model: Path) -> Iterator[HubDouble]:
    double = HubDouble({TINY: tiny_model, HUGE: tiny_model}, claimed_sizes={(HUGE, "model.safetensors"): 2**50}).start()
    yield double
    double.stop()


def hub_env(hub: HubDouble, home: Path, offline: bool = False) -> dict[str, str]:
    """The worker's environment, as its engines get it too: the stand-in hub, a cache of the test's own."""
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0"}


def order(model: str, revision: str | None = None) -> PrefetchOrder:
    return PrefetchOrder(model_name=model, revision=revision)


async def until(prefetcher: Prefetcher, done: Callable[[list[CacheStatus]], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done(prefetcher.statuses()):
        assert time.monotonic() < deadline, prefetcher.statuses()
        await asyncio.sleep(0.05)


def settled(statuses: list[CacheStatus]) -> bool:
    return all(s.state in (CacheState.CACHED, CacheState.FAILED) for s in statuses)


def model_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")}


async def test_a_prefetch_fills_the_cache_with_progress(hub: HubDouble, tiny_model: Path, tmp_path: Path) -> None:
    hub.chunk_delay_s = 0.25  # about 3.5 s for the weights: progress is seen on the way
    changes, done = [], []
    prefetcher = Prefetcher(
        on_change=lambda: changes.append(1), on_done=lambda *a: done.append(a), env=hub_env(hub, tmp_path)
    )
    prefetcher.update([order(TINY)])
    seen: list[tuple[CacheState, int, int | None]] = []

    def watch(statuses: list[CacheStatus]) -> bool:
        seen.append((statuses[0].state, statuses[0].bytes, statuses[0].total))
        return settled(statuses)

    await until(prefetcher, watch)
    [status] = prefetcher.statuses()
    expected = model_files(tiny_model)
    total = sum(len(data) for data in expected.values())
    assert status.state is CacheState.CACHED and status.bytes == status.total == total, status
    assert any(state is CacheState.FETCHING and 0 < done_ < total for state, done_, _ in seen), "no progress seen"
    assert changes and [d[:2] for d in done] == [(TINY, "cached")]
    # The cache the engines read (HF_HOME/hub) holds every file, as huggingface_hub lays it out, refs/main included.
    repo = tmp_path / "hub" / "models--testorg--tiny"
    commit = (repo / "refs" / "main").read_text()
    assert commit == HubDouble.commit(TINY)
    assert model_files(repo / "snapshots" / commit) == expected
    await prefetcher.close()


async def test_bad_sources_fail_clearly(hub: HubDouble, tmp_path: Path) -> None:
    prefetcher = Prefetcher(env=hub_env(hub, tmp_path))
    prefetcher.update([order("testorg/missing"), order(TINY, "nope"), order(HUGE)])
    await until(prefetcher, settled)
    by_model = {(s.model_name, s.revision): s for s in prefetcher.statuses()}
    missing, wrong, huge = by_model[("testorg/missing", None)], by_model[(TINY, "nope")], by_model[(HUGE, None)]
    assert missing.state is CacheState.FAILED and missing.fault is CacheFault.SOURCE
    private = "(a private one needs HF_TOKEN on the workers)"
    assert missing.error == f"repository 'testorg/missing' not found on {hub.url} {private}"
    assert wrong.state is CacheState.FAILED and wrong.fault is CacheFault.SOURCE
    assert wrong.error == f"revision 'nope' not found in repository 'testorg/tiny' on {hub.url}"
    # A model bigger than the disk: refused before a byte is written.
    assert huge.state is CacheState.FAILED and huge.fault is CacheFault.WORKER
    assert huge.error is not None and huge.error.startswith("not enough disk space on this worker for 'testorg/huge'")
    assert not hub.downloads()
    await prefetcher.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real small disk: a 256 KiB tmpfs."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield small
    subprocess.run(["umount", str(small)], check=True)


async def test_a_full_disk_fails_clearly(hub: HubDouble, small_disk: Path) -> None:
    """The cache on a 256 KiB disk, for a model of 0.9 MB."""
    prefetcher = Prefetcher(env=hub_env(hub, small_disk))
    prefetcher.update([order(TINY)])
    await until(prefetcher, settled)
    [status] = prefetcher.statuses()
    assert status.state is CacheState.FAILED and status.fault is CacheFault.WORKER
    assert status.error is not None and "not enough disk space" in status.error and str(small_disk) in status.error
    await prefetcher.close()


def test_the_disk_filling_up_during_a_download_is_said_so() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    message, fault = describe(full, TINY, None, "http://hub", "/cache/huggingface/hub")
    assert fault is CacheFault.WORKER
    assert message.startswith("no space left on this worker's disk for 'testorg/tiny' (Hugging Face cache /cache/")


def test_only_the_weights_an_engine_reads_are_downloaded() -> None:
    with_safetensors = ["model.safetensors", "pytorch_model.bin", "config.json", "onnx/model.onnx"]
    assert "*.bin" in ignore_patterns(with_safetensors) and "onnx/*" in ignore_patterns(with_safetensors)
    assert "*.bin" not in ignore_patterns(["pytorch_model.bin", "config.json"])  # the only weights there are


async def test_an_offline_worker_only_checks_its_cache(hub: HubDouble, tmp_path: Path) -> None:
    online = Prefetcher(env=hub_env(hub, tmp_path))
    online.update([order(TINY)])
    await until(online, settled)
    await online.close()
    # An engine that fetched a model's config and no more (huge's) leaves a snapshot without weights.
    fetch_config = f"import huggingface_hub as h; h.hf_hub_download({HUGE!r}, 'config.json')"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", fetch_config, env=hub_env(hub, tmp_path))
    assert await proc.wait() == 0
    before = len(hub.requests)
    offline = Prefetcher(env=hub_env(hub, tmp_path, offline=True))
    offline.update([order(TINY), order("testorg/other"), order(HUGE)])
    await until(offline, settled)
    by_model = {s.model_name: s for s in offline.statuses()}
    assert by_model[TINY].state is CacheState.CACHED and by_model[TINY].bytes > 800_000
    other, huge = by_model["testorg/other"], by_model[HUGE]
    assert other.state is CacheState.FAILED and other.fault is CacheFault.WORKER
    assert other.error is not None and "not in this worker's Hugging Face cache" in other.error
    assert huge.state is CacheState.FAILED and huge.fault is CacheFault.WORKER
    assert huge.error is not None and "without its weights" in huge.error and "HF_HUB_OFFLINE" in huge.error
    assert len(hub.requests) == before  # it asked the hub nothing
    await offline.close()


async def test_an_unreachable_hub_leaves_a_cached_model_to_start_offline(hub: HubDouble, tmp_path: Path) -> None:
    """The hub unreachable (nothing listens at its address: a proxy or mirror down, no network): a model whole in the
    cache is cached `offline`, for its engines to start with HF_HUB_OFFLINE (vLLM started online fails after about
    107 s of retries, every file on disk); one the cache lacks fails as the hub's to blame."""
    online = Prefetcher(env=hub_env(hub, tmp_path))
    online.update([order(TINY)])
    await until(online, settled)
    assert not online.offline(TINY, None)
    await online.close()
    fetch_config = f"import huggingface_hub as h; h.hf_hub_download({HUGE!r}, 'config.json')"  # no weights
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", fetch_config, env=hub_env(hub, tmp_path))
    assert await proc.wait() == 0
    dead = f"http://127.0.0.1:{free_port()}"
    # No hub watch (probe_interval_s=0): this is the prefetch's own finding (the watch's is the test below).
    cut_off = Prefetcher(env={**hub_env(hub, tmp_path), "HF_ENDPOINT": dead})
    cut_off.update([order(TINY), order(HUGE), order("testorg/other")])
    await until(cut_off, settled)
    by_model = {s.model_name: s for s in cut_off.statuses()}
    tiny = by_model[TINY]
    assert tiny.state is CacheState.CACHED and tiny.bytes == tiny.total and tiny.bytes > 800_000, tiny
    assert cut_off.offline(TINY, None) and not cut_off.offline(HUGE, None) and not cut_off.offline(TINY, "v2")
    for name in (HUGE, "testorg/other"):
        status = by_model[name]
        assert status.state is CacheState.FAILED and status.fault is CacheFault.OTHER, status
        assert status.error is not None and status.error.startswith(f"cannot reach {dead} to download {name!r}")
    await cut_off.close()


async def test_a_launch_waits_for_its_models_check_only_while_the_hub_is_down(hub: HubDouble, tmp_path: Path) -> None:
    """`judged` (awaited before each engine launch): with the hub down, a model just assigned is not yet known to be
    whole in the cache, so `offline` would say no and the engine start online (and fail after about 107 s); judged
    returns once the check is done, and `offline` then says yes. With the hub up it does not wait for the download
    (the engine fetches beside it), and without a hub watch it never waits."""
    async with contextlib.AsyncExitStack() as closing:  # closed however the test ends: a child left would hang it

        def prefetcher(home: Path, probe_interval_s: float = 0.5) -> Prefetcher:
            made = Prefetcher(env=hub_env(hub, home), probe_interval_s=probe_interval_s)
            closing.push_async_callback(made.close)
            return made

        online = prefetcher(tmp_path, 0)
        online.update([order(TINY)])
        await until(online, settled)
        hub.stop()
        during = prefetcher(tmp_path)
        during.running([(TINY, None), ("/models/local", None)])  # assigned, not ordered (the orders come later)
        assert not during.offline(TINY, None)  # not checked yet: a launch now would go online
        await during.judged(TINY, None)
        assert during.hub.down and during.statuses()[0].state is CacheState.CACHED and during.offline(TINY, None)
        during.update([])  # the manager orders nothing here: still had, as it runs
        assert [s.model_name for s in during.statuses()] == [TINY]
        during.running([])
        assert during.statuses() == []

        hub.resume()
        hub.chunk_delay_s = 0.5  # the weights take about 7 s to come
        fresh = prefetcher(tmp_path / "fresh")
        fresh.update([order(TINY)])
        await fresh.judged(TINY, None)
        assert fresh.hub.up is True and fresh.statuses()[0].state in (CacheState.QUEUED, CacheState.FETCHING)
        unwatched = prefetcher(tmp_path / "unwatched", 0)  # no probes: no verdict to wait for
        unwatched.update([order(TINY)])
        await asyncio.wait_for(unwatched.judged(TINY, None), 1)
        assert unwatched.statuses()[0].state in (CacheState.QUEUED, CacheState.FETCHING)


async def test_a_hub_answering_5xx_leaves_a_cached_model_to_start_offline(hub: HubDouble, tmp_path: Path) -> None:
    """A 5xx is the hub down, as the hub watch judges it (a proxy or mirror whose upstream is gone, the hub's own
    outage): a model whole in the cache is cached `offline`, as when nothing answers; one the cache lacks fails with
    the hub's answer (not the source's fault: the model is not failed for it)."""
    online = Prefetcher(env=hub_env(hub, tmp_path))
    online.update([order(TINY)])
    await until(online, settled)
    await online.close()
    hub.fail(503)
    down = Prefetcher(env=hub_env(hub, tmp_path))
    down.update([order(TINY), order("testorg/other")])
    await until(down, settled)
    by_model = {s.model_name: s for s in down.statuses()}
    assert by_model[TINY].state is CacheState.CACHED and down.offline(TINY, None), by_model[TINY]
    other = by_model["testorg/other"]
    assert other.state is CacheState.FAILED and other.fault is CacheFault.OTHER, other
    assert other.error is not None and other.error.startswith(f"{hub.url} answered HTTP 503 for 'testorg/other'")
    await down.close()


async def test_cached_models_start_offline_while_the_hub_watch_finds_it_down(hub: HubDouble, tmp_path: Path) -> None:
    """The hub watch (worker/hub_watch.py): a model cached while the hub answered starts offline once the probe finds
    the hub down, and online again once it answers; one cached `offline` (its prefetch could not reach the hub) is
    fetched again then (its revision may have moved meanwhile)."""
    seen: list[tuple[str, bool]] = []
    online = Prefetcher(env=hub_env(hub, tmp_path), probe_interval_s=0.5, on_hub=lambda url, up: seen.append((url, up)))
    online.update([order(TINY)])
    await until(online, settled)
    assert await eventually(lambda: online.hub.up is True, 10) and not online.offline(TINY, None)
    hub.stop()
    assert await eventually(lambda: online.hub.down, 10)
    assert online.offline(TINY, None) and not online.offline(TINY, "v2")  # only what is cached
    assert seen == [(hub.url, True), (hub.url, False)]
    # Another worker asked for the model during the outage: found whole in the cache, cached `offline`.
    later = Prefetcher(env=hub_env(hub, tmp_path), probe_interval_s=0.5)
    later.update([order(TINY)])
    await until(later, settled)
    assert later.statuses()[0].state is CacheState.CACHED and later.offline(TINY, None)
    mark = len(hub.requests)
    hub.resume()
    assert await eventually(lambda: online.hub.up is True and later.hub.up is True, 10)
    assert not online.offline(TINY, None)
    await until(later, lambda s: s[0].state is CacheState.CACHED)
    assert not later.offline(TINY, None)
    listings = [path for _, path in hub.requests[mark:] if path.startswith(f"/api/models/{TINY}/revision/")]
    assert len(listings) == 1, hub.requests[mark:]  # `later` fetched its model again; `online` had no need to
    assert seen[-1] == (hub.url, True)
    await online.close()
    await later.close()


async def test_a_model_cached_offline_by_a_blip_the_watch_never_saw_is_fetched_again(
    hub: HubDouble, tmp_path: Path
) -> None:
    """The prefetch's listing meets a 503 the watch's probes do not (a blip, or a partial outage): the model is cached
    `offline`, and the next probe that finds the hub up has it fetched again, though the watch never found the hub
    down (no change of verdict)."""
    cached = Prefetcher(env=hub_env(hub, tmp_path))
    cached.update([order(TINY)])
    await until(cached, settled)
    await cached.close()
    hub.fail(503, where="?blobs=true", times=1)  # the listing of model_info(files_metadata=True) alone

    def listings() -> list[str]:
        return [path for _, path in hub.requests if path == f"/api/models/{TINY}?blobs=true"]

    mark = len(listings())
    seen: list[tuple[str, bool]] = []
    blip = Prefetcher(env=hub_env(hub, tmp_path), probe_interval_s=0.5, on_hub=lambda url, up: seen.append((url, up)))
    blip.update([order(TINY)])

    def fetched_again() -> bool:
        return len(listings()) - mark == 2 and blip.statuses()[0].state is CacheState.CACHED

    assert await eventually(fetched_again, 20), (listings(), blip.statuses())
    assert not blip.offline(TINY, None)
    assert seen == [(hub.url, True)]  # the watch never found the hub down
    await blip.close()


async def test_a_slow_hub_is_not_judged_down(hub: HubDouble) -> None:
    """A probe waits up to MIN_PROBE_TIMEOUT_S (2 s) whatever its interval: a hub that takes a second to answer is up
    (judged down, the worker would start engines offline for nothing)."""
    hub.answer_delay_s = 1.0
    seen: list[bool] = []
    watch = HubWatch(hub.url, 0.2, on_change=seen.append)
    watch.watch(TINY)
    assert await eventually(lambda: len([p for _, p in hub.requests if p == f"/api/models/{TINY}"]) >= 3, 20)
    assert seen == [True]
    await watch.close()


async def test_a_model_no_longer_asked_for_stops_downloading(hub: HubDouble, tmp_path: Path) -> None:
    hub.chunk_delay_s = 2.0  # half a minute for the weights
    prefetcher = Prefetcher(env=hub_env(hub, tmp_path))
    prefetcher.update([order(TINY)])
    await until(prefetcher, lambda s: s[0].state is CacheState.FETCHING and s[0].total is not None)
    current = prefetcher._current
    assert current is not None
    pid = current[1].pid
    prefetcher.update([])
    assert prefetcher.statuses() == []
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the download outlived its order"
        await asyncio.sleep(0.05)
    await prefetcher.close()


async def test_a_failed_prefetch_is_tried_again(hub: HubDouble, tiny_model: Path, tmp_path: Path) -> None:
    prefetcher = Prefetcher(env=hub_env(hub, tmp_path), retry_after_s=0.5)
    prefetcher.update([order("testorg/later")])
    await until(prefetcher, settled)
    assert prefetcher.statuses()[0].state is CacheState.FAILED
    hub.repos["testorg/later"] = hub.repos[TINY]  # the repository appears on the hub
    prefetcher.update([order("testorg/later")])
    assert prefetcher.statuses()[0].state is CacheState.FAILED  # not yet: the retry waits
    await asyncio.sleep(0.6)
    prefetcher.update([order("testorg/later")])
    await until(prefetcher, lambda s: s[0].state is CacheState.CACHED)
    await prefetcher.close()
