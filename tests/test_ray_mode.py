"""End to end, hybrid mode: a real local Ray cluster (started and stopped by the fixtures, in its own temp dir
and ports), the manager as a detached actor and the router as a Serve application (`svllm ray-services`), and
a real `svllm worker` outside the cluster serving a real CPU vLLM engine on the tiny model.

The worker sits behind a TCP forwarder and binds 127.0.0.2: only its PUBLIC_URL (the forwarder) reaches it.
The tests run in file order and tell one story: the worker first joins a plain-HTTP manager, moves to the Ray
services by changing only --manager-url, cold-starts the model and serves through the router replica, which
listens on the API port itself (Serve's direct ingress), outlives a SIGKILL of the manager actor, the router
application is deleted and restored with the design's operational commands, and finally Serve is redeployed with
its proxy in front of two router replicas on the one node. One engine is started for the whole module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverless_vllm.testing.ray_head import ray_head_args

from .harness import VENV_BIN, IdleConnection, Service, Stack, alive, descendants, engine_pids, free_ports, wait_until

ray = pytest.importorskip("ray")
yaml = pytest.importorskip("yaml")

# Ray Serve 2.60's own config models trip pydantic's deprecation warnings; they say nothing about this code.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

NAMESPACE = "svllm-test"
ALIAS = "tiny"
CLIENT_TIMEOUT_S = 3.0  # the services' CLIENT_TIMEOUT in this module (slow clients cut off after it)


# --------------------------------------------------------------------------- a Ray cluster of our own


class RayCluster:
    """`ray start --head --block` with every port explicit and a private temp dir: never touches other clusters."""

    def __init__(self, log_dir: Path) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="svr", dir="/tmp"))
        # Ray 2.60 token authentication with a token of our own (not the user's ~/.ray/auth_token); every process
        # of the module (this driver, svllm ray-services, the serve CLI) gets it from the environment.
        self.token = secrets.token_hex(16)
        self.port, self.dashboard_port = free_ports(2)
        self.log_path = log_dir / "ray-head.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> RayCluster:
        args = ray_head_args(VENV_BIN / "ray", self.temp_dir, self.port, self.dashboard_port)
        # No drain wait on SIGTERM: the fixture's teardown should take seconds, not half a minute.
        env = {
            **os.environ,
            **self.auth_env,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._up, 240, interval=0.5, what="the Ray head")  # slow on a loaded machine
        except BaseException:
            self.stop()  # no half-started cluster left behind
            raise
        return self

    @property
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def dashboard_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {self.log_path.read_text()[-3000:]}")
        return httpx.get(f"{self.dashboard}/api/version", headers=self.dashboard_headers, timeout=2).status_code == 200

    def stop(self) -> None:
        """SIGTERM to `ray start --block` stops its node; then anything of ours still alive is killed by pid."""
        if self.proc is None:
            return
        ours = descendants(self.proc.pid)  # before: once the raylet dies its workers are re-parented
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in ours:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def cli(self, *args: str, timeout: float = 60) -> str:
        """`serve ...` / `ray ...` against this cluster, as an operator types it."""
        out = subprocess.run(
            [str(VENV_BIN / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "RAY_ADDRESS": self.address},
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout


# --------------------------------------------------------------------------- a forwarded port (PUBLIC_URL)


class TCPForwarder:
    """127.0.0.1:<port> -> target, like the port forwarding in front of a worker on a remote GPU machine."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.connections = 0
        self.bytes_forwarded = 0  # towards the target: counts requests on reused keep-alive connections too
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-forwarder", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TCPForwarder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, self._count), _pipe(up_reader, writer))

    def _count(self, n: int) -> None:
        self.bytes_forwarded += n


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Callable[[int], None] | None = None
) -> None:
    try:
        while chunk := await reader.read(65536):
            if count is not None:
                count(len(chunk))
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


# --------------------------------------------------------------------------- fixtures


class Env:
    """What the tests share: the cluster, the env of every service, the worker behind its forwarder."""

    def __init__(self, tmp: Path, cluster: RayCluster) -> None:
        self.tmp, self.cluster = tmp, cluster
        self.http = Stack(tmp)  # for the plain-HTTP phase; its env (MANAGER_DB, intervals) is shared by all
        self.env = self.http.env
        self.env["CLIENT_TIMEOUT"] = str(CLIENT_TIMEOUT_S)  # short: test_slow_clients_are_cut_off_by_the_serve_router
        # proxy_port: Serve's own proxy under direct ingress.
        self.serve_port, self.proxy_port, self.worker_port = free_ports(3)
        self.router_replicas = 1
        self.forwarder = TCPForwarder("127.0.0.2", self.worker_port).start()
        self.worker: Service | None = None
        self.services: list[Service] = []

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def start_worker(self, manager_url: str) -> Service:
        """The worker on a 'remote' machine: bound to 127.0.0.2, reachable only through the forwarder."""
        self.worker = Service(
            "w1",
            [
                "worker",
                "--worker-id",
                "w1",
                "--host",
                "127.0.0.2",
                "--port",
                str(self.worker_port),
                "--manager-url",
                manager_url,
            ],
            self.forwarder.port,
            {**self.env, "PUBLIC_URL": self.forwarder.url},
            self.tmp,
        )
        return self.worker.start()

    def ray_services(self, *extra: str, detach: bool = True) -> list[str]:
        return [
            "ray-services",
            "--address",
            self.cluster.address,
            "--namespace",
            NAMESPACE,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.serve_port),
            "--proxy-port",
            str(self.proxy_port),
            "--replicas",
            str(self.router_replicas),
            *(["--detach"] if detach else []),
            *extra,
        ]

    def deploy(self, *extra: str) -> None:
        out = subprocess.run(
            [str(VENV_BIN / "svllm"), *self.ray_services(*extra)],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    def manager(self) -> Any:
        return ray.get_actor("manager", namespace=NAMESPACE)

    def health(self) -> dict[str, Any]:
        return ray.get(self.manager().health.remote(), timeout=30)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.router_url}{path}", timeout=30)

    def model(self, alias: str = ALIAS) -> dict[str, Any]:
        resp = self.get(f"/v1/models/{alias}")
        resp.raise_for_status()
        return resp.json()

    def wait_model(self, state: str, timeout: float = 300) -> dict[str, Any]:
        try:
            return wait_until(
                lambda: (m := self.model())["state"] == state and m,
                timeout,
                interval=0.5,
                what=f"model {ALIAS} {state}",
            )
        except TimeoutError as exc:
            worker_log = self.worker.log(40) if self.worker else ""
            raise AssertionError(f"{exc}\nmodel: {self.model()}\nworker log:\n{worker_log}") from None

    def openai(self, timeout: float = 120) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.router_url}/v1", api_key="unused", max_retries=0, timeout=timeout)

    def stop(self) -> None:
        for service in [*self.services, *([self.worker] if self.worker else [])]:
            service.stop()
        self.http.stop()
        self.forwarder.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    c = RayCluster(tmp_path_factory.mktemp("ray-mode"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in c.auth_env.items():
            mp.setenv(name, value)
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        _reload_ray_auth()
        c.start()
        try:
            # This process is a driver too: the design's operational commands run from here.
            ray.init(address=c.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.stop()
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray reads its auth mode and token once per process (at import): make it see the environment as it is now."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def env(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("ray-mode-services"), cluster)
    yield e
    e.stop()


def completion(env: Env) -> str:
    return env.openai().completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=4).choices[0].text


# --------------------------------------------------------------------------- the story


def test_worker_first_joins_an_http_mode_manager(env: Env, tiny_model: Path) -> None:
    env.http.start(workers=0)
    env.start_worker(env.http.router.url)
    # Registered here, in plain-HTTP mode; it starts on first use (one engine start for the whole module).
    resp = env.http.post(
        "/v1/models/register",
        json={"alias": ALIAS, "model_name": str(tiny_model), "max_model_len": 512, "preload": False},
    )
    assert resp.status_code == 200, resp.text
    worker = wait_until(lambda: env.http.workers_by_id().get("w1"), 30, what="w1 registered")
    assert worker["url"] == env.forwarder.url and worker["state"] == "healthy"  # its PUBLIC_URL, not its bind


def test_ray_services_deploy(env: Env) -> None:
    # The HTTP-mode services go away; the Ray services take over the same registry file (MANAGER_DB).
    env.worker.stop()
    env.http.stop()
    env.deploy()
    health = env.health()  # ray.get(ray.get_actor("manager", namespace=...).health.remote())
    assert health["status"] == "ok" and health["models"] == 1
    status = yaml.safe_load(env.cluster.cli("serve", "status", "-a", env.cluster.dashboard))
    app = status["applications"]["router"]
    assert app["status"] == "RUNNING"
    assert app["deployments"]["Router"]["replica_states"] == {"RUNNING": 1}
    # Direct ingress: the router replica itself listens on the API port (no proxy hop); Serve's proxy stays on
    # the head node, on its own port, in front of the same application.
    health = env.get("/health").json()
    assert listener_pid(env.serve_port) == int(health["router_id"].rsplit("-", 1)[1])
    assert httpx.get(f"http://127.0.0.1:{env.proxy_port}/health", timeout=10).json()["router_id"] == health["router_id"]
    # The dashboard shows both: the Serve application and the named manager actor.
    details = httpx.get(
        f"{env.cluster.dashboard}/api/serve/applications/", headers=env.cluster.dashboard_headers, timeout=10
    ).json()
    assert "router" in details["applications"]
    # KEEP_ALIVE_TIMEOUT (its default, 75 s: Serve's own is 90) is Serve's, for its proxies and the replicas.
    assert details["http_options"]["keep_alive_timeout_s"] == 75
    from ray.util.state import list_actors

    actors = list_actors(address=env.cluster.address, filters=[("name", "=", "manager")])
    assert [a.state for a in actors] == ["ALIVE"] and actors[0].ray_namespace == NAMESPACE
    body = env.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == [ALIAS]


def test_worker_moves_to_ray_services_with_only_a_new_manager_url(env: Env) -> None:
    first_args = env.worker.args
    env.start_worker(env.router_url)  # the Serve router passes worker calls to the manager actor
    assert [a for a in env.worker.args if a not in first_args] == [env.router_url]
    wait_until(
        lambda: (
            [(w["worker_id"], w["url"], w["state"]) for w in env.get("/workers").json()]
            == [("w1", env.forwarder.url, "healthy")]
        ),
        30,
        what="the worker registered at its PUBLIC_URL",
    )
    # The registration came over in MANAGER_DB, cold: the first request is held by the Serve router while the
    # engine starts on the moved worker (generous timeout: engines start slowly on a loaded machine).
    assert env.model()["state"] == "cold"
    assert env.openai(timeout=600).completions.create(model=ALIAS, prompt="x", max_tokens=2).choices
    info = env.wait_model("ready", timeout=30)
    assert [r["worker_id"] for r in info["replicas"]] == ["w1"]
    # The manager actor has no HTTP port: the router relays its metrics (formatted in a thread of the actor).
    relayed = env.get("/manager/metrics")
    assert relayed.status_code == 200, relayed.text
    assert 'svllm_worker_state{worker="w1",state="healthy"} 1.0' in relayed.text
    assert f'svllm_cold_starts_total{{model="{ALIAS}"}} 1.0' in relayed.text


def test_openai_client_through_serve(env: Env) -> None:
    client = env.openai()
    before = env.forwarder.bytes_forwarded
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert chat.model == ALIAS and chat.usage.completion_tokens > 0
    text = client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text is not None and text.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
    )
    assert len(chunks) >= 2 and any(c.choices and c.choices[0].delta.content for c in chunks)
    pieces = list(client.completions.create(model=ALIAS, prompt="abc", max_tokens=8, stream=True))
    assert len(pieces) >= 2 and all(p.model == ALIAS for p in pieces)
    # Only the forwarded address reaches the worker: it does not listen where it would be by its own host/port.
    # (Another process may, by chance: Ray's take random ports after the test chose this one; once, one answered.)
    assert env.forwarder.bytes_forwarded > before
    try:
        elsewhere = httpx.get(f"http://127.0.0.1:{env.worker_port}/health", timeout=2).text
    except httpx.HTTPError:
        elsewhere = ""
    assert '"worker_id":"w1"' not in elsewhere.replace(" ", ""), elsewhere


def test_slow_clients_are_cut_off_by_the_serve_router(env: Env) -> None:
    """Under direct ingress each router replica's server is built by Serve, which names no HTTP protocol: the replica
    makes uvicorn's default ours, so a client trickling its head is answered 408 after CLIENT_TIMEOUT, and what the
    parser refuses is a 400 in the OpenAI shape (as in HTTP mode, dataplane/server_protocol.py). An idle connection
    stays open longer than the official clients keep theirs (KEEP_ALIVE_TIMEOUT, through Serve's HTTP options)."""
    idle = IdleConnection(env.serve_port)
    trickled = socket.create_connection(("127.0.0.1", env.serve_port))
    trickled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    for i in range(6):  # until 0.9 timeouts: its head is cut off at 1 to 1.25 however it trickles
        time.sleep(CLIENT_TIMEOUT_S * 0.15)
        trickled.sendall(b"x-slow-%d: y\r\n" % i)
    assert env.openai().models.list().data  # served meanwhile
    malformed = socket.create_connection(("127.0.0.1", env.serve_port))
    malformed.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n")
    for sock, status, code in ((trickled, 408, "request_timeout"), (malformed, 400, "invalid_http_request")):
        sock.settimeout(CLIENT_TIMEOUT_S * 3)
        raw = b"".join(iter(lambda s=sock: s.recv(65536), b""))  # until the router closes it
        sock.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), raw
        assert json.loads(rest)["error"]["code"] == code, raw
    idle.reuse_after()


def test_errors_cross_ray_intact(env: Env) -> None:
    from serverless_vllm.errors import APIError
    from serverless_vllm.ray_mode.client import RayManagerClient

    resp = env.get("/v1/models/nope")  # router replica -> actor -> APIError pickled back -> OpenAI error shape
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"

    async def calls() -> None:
        with pytest.raises(APIError) as err:
            await RayManagerClient(namespace=NAMESPACE).get_model("nope")
        assert (err.value.status, err.value.code) == (404, "model_not_found") and type(err.value) is APIError
        with pytest.raises(APIError) as err:
            await RayManagerClient(name="no-such-manager", namespace=NAMESPACE).health()
        assert (err.value.status, err.value.code) == (503, "manager_unavailable")

    asyncio.run(calls())


def test_usage_reports_cross_ray_and_are_applied_once(env: Env) -> None:
    """The calls a router's usage reporter makes (router/usage_report.py), against the manager actor."""
    from serverless_vllm.ray_mode.client import RayManagerClient
    from serverless_vllm.schemas import UsageReport, UsageRow

    row = UsageRow(key_id="key-ray", key_name="ray", tenant="t", model=ALIAS, requests=2, prompt_tokens=7)

    async def calls() -> list[tuple[str, int, int]]:
        manager = RayManagerClient(namespace=NAMESPACE)
        report = UsageReport(reporter="ray-test/1", seq=1, rows=[row])
        await manager.report_usage(report)
        await manager.report_usage(report)  # sent again (its answer lost): applied once
        return [(r.key_id, r.requests, r.prompt_tokens) for r in await manager.usage("key-ray", "")]

    assert asyncio.run(calls()) == [("key-ray", 2, 7)]


def listener_pid(port: int) -> int:
    """The process listening on 127.0.0.1:port (ss is iproute2's, present wherever the tests run)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split("pid=", 1)[1].split(",", 1)[0])


def router_healths(env: Env) -> dict[str, dict[str, Any]]:
    """/health of every router replica (the proxy spreads requests; ask until each one has answered)."""
    seen: dict[str, dict[str, Any]] = {}

    def all_seen() -> bool:
        health = env.get("/health").json()
        seen[health["router_id"]] = health
        return len(seen) >= env.router_replicas

    wait_until(all_seen, 30, interval=0.05, what="every router replica to answer")
    return seen


def test_manager_actor_killed_comes_back_while_ready_model_serves(env: Env) -> None:
    before = env.health()
    replicas = {r["replica_id"] for r in env.model()["replicas"]}
    engines = engine_pids() & descendants(env.worker.proc.pid)
    assert engines
    pid = ray.get(env.manager().pid.remote())
    os.kill(pid, signal.SIGKILL)  # the process dies; Ray restarts the actor (max_restarts=-1)
    served, t0 = 0, time.monotonic()

    def back() -> dict[str, Any] | None:
        try:
            health = ray.get(env.manager().health.remote(), timeout=2)
        except (ray.exceptions.RayError, TimeoutError):
            return None
        return health if health["epoch"] != before["epoch"] else None

    def recovered(epoch: str) -> bool:
        return (
            env.health()["workers"]["healthy"] == 1
            and env.model()["state"] == "ready"
            and {h["routing_epoch"] for h in router_healths(env).values()} == {epoch}
        )

    # Requests keep flowing the whole time: during the gap (served from the routers' own tables), while the
    # actor restarts, and while the worker re-registers; not one may fail.
    health: dict[str, Any] | None = None
    while time.monotonic() - t0 < 90:
        assert completion(env) is not None
        served += 1
        if health is None:
            health = back()
        elif recovered(health["epoch"]):
            break
    assert health is not None, "the manager actor did not come back"
    assert recovered(health["epoch"]), "no full recovery within 90 s"
    assert served >= 2 and health["models"] == 1  # registrations reloaded from SQLite
    assert ray.get(env.manager().pid.remote()) != pid
    # The worker re-registered with its running engine: adopted, not restarted.
    assert {r["replica_id"] for r in env.model()["replicas"]} == replicas
    assert all(alive(p) for p in engines)


def test_replace_manager_keeps_registrations_and_engines(env: Env) -> None:
    before = env.health()
    replicas = {r["replica_id"] for r in env.model()["replicas"]}
    pid = ray.get(env.manager().pid.remote())
    env.deploy("--replace-manager")  # e.g. new settings or credentials: a new actor, not a restart
    after = env.health()
    assert after["epoch"] != before["epoch"] and after["models"] == 1
    assert ray.get(env.manager().pid.remote()) != pid
    # Routers find the new actor by name (the old handle is dead); the worker re-registers, its engine adopted.
    wait_until(
        lambda: (
            env.health()["workers"]["healthy"] == 1
            and env.model()["state"] == "ready"
            and {h["routing_epoch"] for h in router_healths(env).values()} == {after["epoch"]}
        ),
        60,
        what="recovery with the new manager actor",
    )
    assert {r["replica_id"] for r in env.model()["replicas"]} == replicas
    assert completion(env) is not None


def router_gone(env: Env) -> Callable[[], bool]:
    def gone() -> bool:  # direct ingress: the replica's socket closed with it
        try:
            return env.get("/health").status_code == 404
        except httpx.ConnectError:
            return True

    return gone


def test_serve_delete_and_ray_services_again_restores_the_router(env: Env) -> None:
    manager_pid = ray.get(env.manager().pid.remote())
    from ray import serve

    serve.delete("router")  # Ray 2.60's CLI has no `serve delete`; the API call is the operator's command
    wait_until(router_gone(env), 30, what="the router application gone")
    # `svllm ray-services` again, in the foreground this time (as a container's main process runs it).
    service = Service("ray-services", env.ray_services(detach=False), env.serve_port, env.env, env.tmp)
    env.services.append(service)
    service.start(timeout=180)
    wait_until(lambda: "services up" in service.log(), 60, what="ray-services to finish deploying")
    # The worker heartbeats through the router (its MANAGER_URL): with the tests' 5 s HEARTBEAT_TIMEOUT a redeploy
    # slower than 10 s has it declared dead, and it registers again with its next heartbeat through the new router.
    wait_until(
        lambda: [w["state"] for w in env.get("/workers").json()] == ["healthy"],
        30,
        what="the worker back through the new router",
    )
    assert completion(env) is not None
    assert ray.get(env.manager().pid.remote()) == manager_pid  # the actor is reused, not re-created
    # Stopping the foreground command leaves the detached services running in the cluster.
    service.stop()
    assert service.proc.returncode == 0, service.log()
    assert env.get("/health").status_code == 200 and completion(env) is not None


def test_direct_ingress_refuses_more_replicas_than_nodes(env: Env) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "svllm"), *env.ray_services("--replicas", "2")],
        env={**os.environ, **env.env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "--ingress proxy" in out.stderr, out.stderr[-3000:]
    assert completion(env) is not None  # refused before touching what runs


def test_proxy_ingress_two_router_replicas_keep_their_own_consistent_tables(env: Env, tiny_model: Path) -> None:
    from ray import serve

    # Switching the ingress restarts Serve (its proxy settings are fixed when it starts); the manager actor and
    # the engine stay.
    from serverless_vllm.ray_mode.ingress import wait_until_bindable

    serve.shutdown()
    # Serve's proxy binds with SO_REUSEADDR, and so did the stopped replica (ingress.reuse_address_on_rebind): only
    # a replica still listening is waited for, not its closed connections in TIME_WAIT.
    wait_until_bindable("127.0.0.1", env.serve_port, reuse_address=True)
    env.router_replicas = 2
    env.deploy("--ingress", "proxy")
    idle = IdleConnection(env.serve_port)  # Serve's proxy: KEEP_ALIVE_TIMEOUT through its HTTP options
    status = yaml.safe_load(env.cluster.cli("serve", "status", "-a", env.cluster.dashboard))
    assert status["applications"]["router"]["deployments"]["Router"]["replica_states"] == {"RUNNING": 2}
    assert listener_pid(env.serve_port) not in {int(r.rsplit("-", 1)[1]) for r in router_healths(env)}
    version = env.health()["routing_version"]
    wait_until(
        lambda: {h["routing_version"] for h in router_healths(env).values()} == {version},
        30,
        what="both replicas at the manager's version",
    )
    # A registration through one replica reaches the other through its own long-poll.
    resp = httpx.post(
        f"{env.router_url}/v1/models/register",
        timeout=30,
        json={"alias": "lazy", "model_name": str(tiny_model), "preload": False},
    )
    assert resp.status_code == 200 and resp.json()["state"] == "cold"
    wait_until(
        lambda: all(h["models"] == 2 for h in router_healths(env).values()),
        30,
        what="both replicas to see the new alias",
    )
    assert httpx.delete(f"{env.router_url}/v1/models/lazy", timeout=30).status_code == 200
    wait_until(
        lambda: all(h["models"] == 1 for h in router_healths(env).values()), 30, what="both replicas to drop the alias"
    )
    healths = router_healths(env)
    assert len({h["routing_epoch"] for h in healths.values()}) == 1
    for _ in range(6):  # whichever replica answers, the ready model is served
        assert completion(env) is not None
    idle.reuse_after()
