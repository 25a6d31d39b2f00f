"""The worker's model cache, warm before it is needed: the hub models the manager asks for (each heartbeat reply
carries the complete list, manager/model_cache.py chooses it) are downloaded into the Hugging Face cache that every
engine of this worker reads, one model at a time, each by a child process (worker/hub_download.py) whose progress
is reported in the next heartbeats.

An engine start never waits for its prefetch: vLLM downloads what it lacks itself, and huggingface_hub's file locks
keep the two from writing the same file twice. A model the manager no longer asks for is forgotten (its download
killed if under way); its files stay in the cache. A failed download is tried again after RETRY_AFTER_S, if still
asked for.

A cached model's engines start offline (HF_HUB_OFFLINE; hub_download.py says why) while the hub does not answer:
when its prefetch found the hub unreachable and the model whole in the cache (cached `offline`), and whenever the
hub watch (hub_watch.py) last found the hub down, however the model was cached. When a probe finds the hub answering
(after an outage, or after a blip that only the prefetch met), the models cached `offline` are fetched again (their
revision may have moved meanwhile) and start online.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..aio import stop_tasks
from ..schemas import CacheFault, CacheState, CacheStatus, PrefetchOrder
from ..security.models import is_hub_id
from ..settings_base import truthy
from .hub_watch import DEFAULT_ENDPOINT, HubWatch

log = logging.getLogger(__name__)

RETRY_AFTER_S = 300.0
# A launch waits at most this long for its model's check while the hub is down or not yet probed (Prefetcher.judged):
# a refused connection is found at once, a silent hub within the probe's timeout (10 s).
JUDGE_WAIT_S = 60.0
_JUDGE_POLL_S = 0.1
_UNDER_WAY = (CacheState.QUEUED, CacheState.FETCHING)
_STDERR_TAIL = 2000  # characters of a failed child's stderr kept for its error

Key = tuple[str, str | None]  # (model name, revision)


@dataclass
class _Entry:
    state: CacheState = CacheState.QUEUED
    bytes: int = 0
    total: int | None = None
    error: str | None = None
    fault: CacheFault | None = None
    failed_at: float | None = None  # monotonic
    started_at: float | None = None
    offline: bool = False  # cached from the cache alone, the hub unreachable: its engines start offline


class Prefetcher:
    """`on_change`: called when a download ends (cached or failed), so the manager hears of it at once.
    `on_done(model, result, seconds)` and `on_hub(endpoint, up)`: the metrics' hooks. `env`: the children's
    environment (default: the worker's, which its engines get too). `probe_interval_s`: seconds between probes of
    the hub while hub models are asked for (the worker's HUB_PROBE_INTERVAL; 0: never probed)."""

    def __init__(
        self,
        *,
        on_change: Callable[[], None] = lambda: None,
        on_done: Callable[[str, str, float], None] = lambda model, result, seconds: None,
        on_hub: Callable[[str, bool], None] = lambda endpoint, up: None,
        env: Mapping[str, str] | None = None,
        retry_after_s: float = RETRY_AFTER_S,
        probe_interval_s: float = 0,
    ) -> None:
        self._on_change = on_change
        self._on_done = on_done
        self._on_hub = on_hub
        self._env = dict(os.environ if env is None else env)
        self._env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # its stderr is kept for errors, not for bars
        self._retry_after_s = retry_after_s
        self._entries: dict[Key, _Entry] = {}
        self._ordered: list[Key] = []  # the manager's orders
        self._running: list[Key] = []  # the hub models of this worker's engines
        self._task: asyncio.Task[None] | None = None
        self._current: tuple[Key, asyncio.subprocess.Process] | None = None
        offline = any(truthy(self._env.get(name, "")) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        self.hub = HubWatch(
            self._env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT,
            0 if offline else probe_interval_s,  # offline by the operator's choice: every engine is already
            on_change=lambda up: self._on_hub(self.hub.endpoint, up),
            on_up=self._fetch_offline_again,
        )

    def update(self, orders: list[PrefetchOrder]) -> None:
        """The manager's complete list: new models are queued, models no longer listed (nor run here) forgotten."""
        self._ordered = [(o.model_name, o.revision) for o in orders]
        self._sync()

    def running(self, models: Iterable[Key]) -> None:
        """The (model, revision) of every engine assigned here: the hub models among them are had (checked) as if
        ordered, whether or not this worker is one of the manager's targets. The worker judges a hub outage only for
        what it has (`offline`), and its assignments come before any order (pushed by the manager): a replica beyond
        the targets, or one registered with `preload` during an outage, would start online and fail."""
        self._running = [k for k in dict.fromkeys(models) if is_hub_id(k[0])]
        self._sync()

    def _sync(self) -> None:
        wanted = list(dict.fromkeys([*self._ordered, *self._running]))
        for key in [k for k in self._entries if k not in wanted]:
            del self._entries[key]
            if self._current is not None and self._current[0] == key and self._current[1].returncode is None:
                log.info("prefetch of %s no longer wanted: stopped", _label(key))
                self._current[1].kill()
        now = time.monotonic()
        for key in wanted:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry()
                log.info("prefetch of %s queued", _label(key))
            elif entry.failed_at is not None and now - entry.failed_at >= self._retry_after_s:
                self._entries[key] = _Entry()
                log.info("prefetch of %s queued again (it failed %.0f s ago)", _label(key), now - entry.failed_at)
        self._start()
        self.hub.watch(next(iter(self._entries), (None, None))[0])

    def _start(self) -> None:
        if self._task is None and any(e.state is CacheState.QUEUED for e in self._entries.values()):
            self._task = asyncio.create_task(self._run(), name="prefetch")

    def statuses(self) -> list[CacheStatus]:
        return [
            CacheStatus(
                model_name=model,
                revision=revision,
                state=e.state,
                bytes=e.bytes,
                total=e.total,
                error=e.error,
                fault=e.fault,
            )
            for (model, revision), e in self._entries.items()
        ]

    def offline(self, model: str, revision: str | None) -> bool:
        """Whether this model's engines must start offline (HF_HUB_OFFLINE) now: it is whole in the cache and the
        hub does not answer (its prefetch found so, or the watch's latest probe), where vLLM, started online, would
        fail after minutes of retries."""
        entry = self._entries.get((model, revision))
        return entry is not None and entry.state is CacheState.CACHED and (entry.offline or self.hub.down)

    async def judged(self, model: str, revision: str | None, timeout: float = JUDGE_WAIT_S) -> None:
        """Return once `offline` can be believed for this model's launch: at once, unless its check is still to come
        (queued or under way) while the hub is down or not yet probed; then when the hub is found up (the engine
        downloads beside the prefetch, as ever) or the check is done (whole in the cache: offline). Without it a
        model registered, or placed here, during an outage started online and failed after minutes of vLLM's retries
        though its files were in the cache. At most `timeout` (then the launch goes on as it would have)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._entries.get((model, revision))
            if entry is None or entry.state not in _UNDER_WAY or self.hub.up or not self.hub.watching:
                return
            await asyncio.sleep(_JUDGE_POLL_S)

    def _fetch_offline_again(self) -> None:
        """The hub answers: what was cached from the cache alone is fetched again (its revision may have moved)."""
        for key in [k for k, e in self._entries.items() if e.offline and e.state is CacheState.CACHED]:
            self._entries[key] = _Entry()
            log.info("prefetch of %s queued again (the hub answers)", _label(key))
        self._start()

    async def close(self) -> None:
        if self._current is not None and self._current[1].returncode is None:
            self._current[1].kill()
        await stop_tasks(self._task)
        await self.hub.close()

    # ------------------------------------------------------------------ the downloads, one at a time

    async def _run(self) -> None:
        try:
            while True:
                key = next((k for k, e in self._entries.items() if e.state is CacheState.QUEUED), None)
                if key is None:
                    return
                entry = self._entries[key]
                try:
                    await self._fetch(key, entry)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the child could not even start
                    if self._entries.get(key) is entry:
                        self._finish(key, entry, f"prefetch could not run: {exc}", CacheFault.OTHER)
        finally:
            self._task = None

    async def _fetch(self, key: Key, entry: _Entry) -> None:
        model, revision = key
        entry.state, entry.started_at = CacheState.FETCHING, time.monotonic()
        log.info("prefetching %s", _label(key))
        args = [sys.executable, "-m", "serverless_vllm.worker.hub_download", model]
        if revision is not None:
            args += ["--revision", revision]
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            preexec_fn=_die_with_worker(),
        )
        self._current = (key, proc)
        stderr = asyncio.ensure_future(_read_all(proc.stderr))
        outcome: dict[str, object] | None = None
        try:
            assert proc.stdout is not None
            async for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "listed":
                    entry.total = int(event["total"])
                elif event.get("event") in ("progress", "done"):
                    entry.bytes = int(event["bytes"])
                    entry.offline = event.get("offline") is True
                if event.get("event") in ("done", "failed"):
                    outcome = event
            await proc.wait()
        finally:
            self._current = None
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        err = await stderr
        if self._entries.get(key) is not entry:
            return  # forgotten meanwhile (the child was killed): nothing to report
        if outcome is not None and outcome["event"] == "done" and proc.returncode == 0:
            entry.state, entry.total = CacheState.CACHED, entry.total if entry.total is not None else entry.bytes
            entry.bytes = max(entry.bytes, entry.total or 0)
            self._on_done(model, "cached", time.monotonic() - (entry.started_at or 0))
            how = " (the hub unreachable: found whole in the cache, its engines start offline)" if entry.offline else ""
            log.info("prefetched %s: %d bytes in the cache%s", _label(key), entry.bytes, how)
            self._on_change()
        elif outcome is not None and outcome["event"] == "failed":
            self._finish(key, entry, str(outcome["error"]), _fault(outcome.get("fault")))
        else:
            tail = err.strip()[-_STDERR_TAIL:]
            error = f"the download of {_label(key)} exited with code {proc.returncode}: {tail}"
            self._finish(key, entry, error, CacheFault.OTHER)

    def _finish(self, key: Key, entry: _Entry, error: str, fault: CacheFault) -> None:
        entry.state, entry.error, entry.fault = CacheState.FAILED, error, fault
        entry.failed_at = time.monotonic()
        self._on_done(key[0], "failed", entry.failed_at - (entry.started_at or entry.failed_at))
        log.warning("prefetch of %s failed: %s", _label(key), error)
        self._on_change()


def _die_with_worker() -> Callable[[], None]:
    """A download is the worker's: it ends with it (PR_SET_PDEATHSIG), as its engines do (spawn.py)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here, in the parent: the forked child must not dlopen
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died between fork and prctl
            os._exit(1)

    return preexec


async def _read_all(stream: asyncio.StreamReader | None) -> str:
    if stream is None:
        return ""
    data = await stream.read()
    return data.decode(errors="replace")


def _fault(value: object) -> CacheFault:
    try:
        return CacheFault(str(value))
    except ValueError:
        return CacheFault.OTHER


def _label(key: Key) -> str:
    model, revision = key
    return model + (f"@{revision}" if revision else "")
