"""LoRA adapters in the worker's engines: each engine made to hold the adapters its assignment names, through the
engine's runtime adapter API on 127.0.0.1 (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`; never relayed
for clients: dataplane/endpoints.py lists no such route), and what it holds read back from the engine's own
`/v1/models` (its adapters are the entries with a `parent`): heartbeats report that, not what was asked.

One sync at a time per engine; a change meanwhile runs it again. A load the engine refuses is reported with the
engine's reason and not tried again while the assignment still names it (the manager fails the adapter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

import httpx

from ..schemas import Assignment, ReplicaState
from .adapter_fetch import AdapterFetcher, AdapterFetchError
from .engine import EngineProcess

log = logging.getLogger(__name__)

# A load reads the adapter's files from disk (a hub adapter is fetched by the worker first: adapter_fetch.py). The
# list and unloads answer at once.
LOAD_TIMEOUT_S = 300.0
CALL_TIMEOUT_S = 30.0


class AdapterSync:
    def __init__(self, on_change: Callable[[], None], fetcher: AdapterFetcher | None = None) -> None:
        """`on_change`: what an engine holds (or refused) changed: the manager should hear it now. `fetcher`: hub
        adapters' folders in this worker's cache (adapter_fetch.py)."""
        self._on_change = on_change
        self._fetcher = fetcher or AdapterFetcher()
        self._client: httpx.AsyncClient | None = None
        self._desired: dict[str, dict[str, str]] = {}  # replica id -> adapter name -> weights
        self._loaded: dict[str, list[str]] = {}  # replica id -> adapters its engine lists
        self._errors: dict[str, dict[str, str]] = {}  # replica id -> adapter -> the engine's reason
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def update(self, engines: Mapping[str, EngineProcess], assignments: Mapping[str, Assignment]) -> None:
        """The manager's assignments: each LoRA engine made to hold what its assignment names."""
        for rid in [rid for rid in self._desired if rid not in engines]:
            self._forget(rid)
        for rid, engine in engines.items():
            assignment = assignments.get(rid)
            desired = dict(assignment.adapters) if assignment is not None else {}
            if not desired and rid not in self._desired:
                continue
            self._desired[rid] = desired
            errors = self._errors.get(rid, {})
            for name in [n for n in errors if n not in desired]:
                del errors[name]  # no longer asked for: asked again later, it is tried again
            self._kick(rid, engine)

    def refresh(self, engines: Mapping[str, EngineProcess]) -> None:
        """An engine changed state (ready, restarted): what it holds is read again, and loaded again if lost."""
        for rid, engine in engines.items():
            if engine.assignment.engine.enable_lora and (rid in self._desired or rid in self._loaded):
                self._kick(rid, engine)

    def loaded(self, replica_id: str) -> list[str]:
        return self._loaded.get(replica_id, [])

    def errors(self, replica_id: str) -> dict[str, str]:
        return dict(self._errors.get(replica_id, {}))

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _forget(self, rid: str) -> None:
        self._desired.pop(rid, None)
        self._loaded.pop(rid, None)
        self._errors.pop(rid, None)
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    def _kick(self, rid: str, engine: EngineProcess) -> None:
        if rid in self._tasks:
            self._again.add(rid)
            return
        task = asyncio.create_task(self._run(rid, engine), name=f"adapters-{rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._tasks.pop(rid, None))

    async def _run(self, rid: str, engine: EngineProcess) -> None:
        while True:
            self._again.discard(rid)
            try:
                await self._sync(rid, engine)
            except httpx.HTTPError as exc:
                log.warning("engine %s: adapter sync failed (%s)", rid, exc)
            if rid not in self._again:
                return

    async def _sync(self, rid: str, engine: EngineProcess) -> None:
        if engine.state is not ReplicaState.READY:
            self._set_loaded(rid, [])  # starting again (a crash): it holds none until it is ready
            return
        desired = self._desired.get(rid, {})
        errors = self._errors.setdefault(rid, {})
        before = dict(errors)
        loaded = await self._list(engine)
        for name in sorted(set(loaded) - desired.keys()):
            await self._call(engine, "/v1/unload_lora_adapter", {"lora_name": name}, CALL_TIMEOUT_S)
            log.info("engine %s: unloaded adapter %s", rid, name)
        for name, weights in desired.items():
            if name in loaded or name in errors:
                continue
            try:
                path = await self._fetcher.folder(weights)
            except AdapterFetchError as exc:
                reason: str | None = str(exc)
            else:
                body = {"lora_name": name, "lora_path": path}
                reason = await self._call(engine, "/v1/load_lora_adapter", body, LOAD_TIMEOUT_S)
            if reason is None:
                log.info("engine %s: loaded adapter %s (%s) from %s", rid, name, weights, path)
            else:
                errors[name] = reason
                log.warning("engine %s: adapter %s refused: %s", rid, name, reason)
        self._set_loaded(rid, await self._list(engine), errors != before)

    def _set_loaded(self, rid: str, loaded: list[str], changed: bool = False) -> None:
        if changed or self._loaded.get(rid, []) != loaded:
            self._loaded[rid] = loaded
            self._on_change()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def _list(self, engine: EngineProcess) -> list[str]:
        resp = await self._http().get(f"{engine.base_url}/v1/models", timeout=CALL_TIMEOUT_S)
        resp.raise_for_status()
        return sorted(m["id"] for m in resp.json().get("data", []) if m.get("parent"))

    async def _call(self, engine: EngineProcess, path: str, body: dict[str, str], timeout: float) -> str | None:
        """None when the engine did it, else its reason."""
        resp = await self._http().post(f"{engine.base_url}{path}", json=body, timeout=timeout)
        if resp.status_code == 200:
            return None
        reason = resp.text[:1000]
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            reason = str(resp.json()["error"]["message"])[:1000]
        return reason
