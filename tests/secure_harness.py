"""Helpers for the security, fault, fuzz and load tests: a Stack with credentials on, process bookkeeping from
/proc, and the observations file the tests write (docs/reliability.md quotes it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from .harness import Stack, alive, descendants

API_KEY = "svllm-test-client-key-0123456789"
API_KEY_2 = "svllm-test-client-key-abcdefghij"
ADMIN_KEY = "svllm-test-admin-key-0123456789"
WORKER_TOKEN = "svllm-test-worker-token-012345"
SECRETS = (API_KEY, API_KEY_2, ADMIN_KEY, WORKER_TOKEN)

AUTH_ENV = {
    "SVLLM_AUTH": "on",
    "SVLLM_API_KEYS": f"{API_KEY},{API_KEY_2}",
    "SVLLM_ADMIN_KEY": ADMIN_KEY,
    "SVLLM_WORKER_TOKEN": WORKER_TOKEN,
}

REPO = Path(__file__).resolve().parents[1]
OBSERVATIONS = Path(os.environ.get("SVLLM_OBSERVATIONS_DIR", REPO / "build" / "reliability"))


# One credentialed one-worker stack serves the security, fuzz and load tests (tests/conftest.py: `secure_stack`):
# one engine start instead of three. Its settings are the union of what those modules need: one engine slot held
# by the real model (min_replicas 1, never evicted), so registrations the fuzzer makes cannot start engines; a
# short cold-start timeout so requests for them end quickly; failed models stay failed; a cap of 8 requests in
# flight per replica for the load test's overload step; a short client timeout for the slow-client test.
SHARED_ALIAS = "tiny"
SHARED_MAX_MODEL_LEN = 2048  # long generations: a request that is not aborted is still running when checked
SHARED_CAP = 8
SHARED_ENV = {
    "CPU_SLOTS": "1",
    "COLD_START_TIMEOUT": "2",
    "FAILED_RETRY_AFTER": "600",
    "MAX_INFLIGHT_PER_REPLICA": str(SHARED_CAP),
    "CLIENT_TIMEOUT": "3",  # the security tests' slow clients are cut off in seconds
}
SHARED_SPEC = {"max_model_len": SHARED_MAX_MODEL_LEN, "min_replicas": 1, "max_replicas": 1}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class SecureStack(Stack):
    """A Stack with credentials on; its helpers send the admin key (tests pass other headers explicitly)."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(tmp, {**AUTH_ENV, **(env or {})})

    def get(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", bearer(ADMIN_KEY))
        return super().get(path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", bearer(ADMIN_KEY))
        return super().post(path, **kw)

    def openai(self, **kw: Any) -> Any:
        kw.setdefault("api_key", API_KEY)
        return super().openai(**kw)

    def register(self, alias: str, model: Path | str, **spec: Any) -> dict[str, Any]:
        resp = self.post("/v1/models/register", json={"alias": alias, "model_name": str(model), **spec})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def engines(self, worker: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.workers[worker].url}/engines", headers=bearer(WORKER_TOKEN), timeout=10)
        resp.raise_for_status()
        return resp.json()

    def all_logs(self) -> str:
        """Every log this stack wrote: services and engines."""
        files = [*self.tmp.glob("*.log"), *(self.tmp / "state").rglob("*.log")]
        return "\n".join(f.read_text(errors="replace") for f in files)


def rss_kib(pid: int) -> int:
    """Resident set size of one process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def service_tree(stack: Stack) -> set[int]:
    """Every process started by a stack's services (engines included)."""
    pids: set[int] = set()
    for service in [stack.manager, stack.router, *stack.workers.values()]:
        if service.proc is not None and service.proc.poll() is None:
            pids |= {service.proc.pid, *descendants(service.proc.pid)}
    return pids


def living(pids: set[int]) -> set[int]:
    return {p for p in pids if alive(p)}


class Observations:
    """What a test module saw, as JSON: written at the end of the module for docs/reliability.md."""

    def __init__(self, name: str) -> None:
        self.path = OBSERVATIONS / f"{name}.json"
        self.data: dict[str, Any] = {"module": name, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        return self.path


def start_shared_stack(tmp: Path, model: Path) -> SecureStack:
    stack = SecureStack(tmp, env=SHARED_ENV).start(workers=1)
    try:
        stack.register(SHARED_ALIAS, model, **SHARED_SPEC)
        stack.wait_model(SHARED_ALIAS, "ready", timeout=300)
    except BaseException:
        stack.stop()
        raise
    return stack
