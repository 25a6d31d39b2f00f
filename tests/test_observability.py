"""Observability: the metrics of router, manager and worker, vLLM's own metrics through service discovery, the
Prometheus configuration and alert rules, and every Grafana dashboard panel proven against a real Prometheus.

The end-to-end part runs a real Prometheus (Debian package; installed by prometheus/install-prometheus.sh when
missing) with the repository's prometheus/prometheus.yml and alert rules, only its addresses pointed at a local
stack (manager, router, one worker, one CPU vLLM engine on the tiny model) and its intervals shortened to 1 s.
After traffic through the official openai client, every query of every panel must return data.

GPU series cannot have data on these machines (no GPU, no driver): their panels' queries must still be accepted
by Prometheus, and the metrics they read must be those the worker exports when it has GPUs, which is checked
against tests/fake_nvml.py, a stand-in for NVML (pynvml's interface) and the GPU that cannot exist here.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serverless_vllm.config import ManagerSettings, RouterSettings, WorkerSettings
from serverless_vllm.dataplane.endpoints import LABELS
from serverless_vllm.metrics import sd
from serverless_vllm.metrics.common import UNKNOWN_MODEL
from serverless_vllm.metrics.router import RouterMetrics
from serverless_vllm.metrics.worker import WorkerMetrics
from serverless_vllm.router.table import RouteTable
from serverless_vllm.schemas import (
    EngineStatus,
    ModelRoute,
    ModelState,
    ReplicaState,
    RoutingTable,
    WorkerInfo,
    WorkerState,
)
from serverless_vllm.testing.tiny_lora import make_tiny_lora
from serverless_vllm.worker.gpus import GPUProbe

from .fake_nvml import NVML_ERROR_LIBRARY_NOT_FOUND, FakeGPU, FakeNVML
from .harness import Stack, free_port, wait_until

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
DOCS = REPO / "docs" / "observability.md"
ALIAS = "tiny"
# LoRA adapters of ALIAS (served in float32 with max_loras 1): requested in turn, for the LoRA adapters panels.
ADAPTERS = ("obs-ad1", "obs-ad2")
WORKER = "w1"
# Authentication stays on: Prometheus scrapes and discovers without credentials (read-only ops paths).
CLIENT_KEY, ADMIN_KEY, WORKER_TOKEN = "obs-client-key", "obs-admin-key", "obs-worker-token"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
SCRAPE_S = 1
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8
# The router's `endpoint` label values drive_traffic produces (the stack serves chat and completions only).
SERVED_ENDPOINTS = ["chat_completions", "completions"]

_NAME = r"(?<![A-Za-z0-9_:])((?:svllm_|vllm:)[A-Za-z0-9_:]*[A-Za-z0-9_])"


# --------------------------------------------------------------------------- dashboards as data


@dataclass
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool
    repeat: str | None = None  # the variable the panel's row repeats over: one copy of the row per value


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in DASHBOARDS}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel, _ in panels_in_rows(board):
        yield panel


def panels_in_rows(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Every panel with the row it belongs to: an open row holds the panels after it up to the next row, a
    collapsed one those inside it."""
    row = None
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel
            yield panel, None
            for inner in panel.get("panels", []):  # panels inside collapsed rows
                yield inner, panel
        else:
            yield panel, row


def queries() -> list[Query]:
    out = []
    for name, board in load_dashboards().items():
        for panel, row in panels_in_rows(board):
            repeat = (row or {}).get("repeat") or None
            for t in panel.get("targets", []):
                out.append(Query(name, panel["title"], t["refId"], t["expr"], bool(t.get("instant")), repeat))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(_NAME, expr))


def substitute(expr: str, variables: dict[str, str], range_s: int) -> str:
    """Grafana's variables as Grafana would expand them for the chosen values."""
    expr = expr.replace("$__rate_interval", f"{max(4 * SCRAPE_S, 10)}s").replace("$__interval", f"{SCRAPE_S}s")
    expr = expr.replace("$__range", f"{range_s}s")
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def documented_or_used(name: str, corpus: str) -> bool:
    return (
        re.search(rf"(?<![A-Za-z0-9_:]){re.escape(name)}(?:_bucket|_sum|_count)?(?![A-Za-z0-9_:])", corpus) is not None
    )


def exported_names(exposition: str) -> set[str]:
    """Metric names as written in PromQL (counters with _total, histograms by base name); the `_created`
    timestamps prometheus_client adds to counters and histograms are not metrics of ours."""
    out = set()
    for family in text_string_to_metric_families(exposition):
        if family.name.endswith("_created"):
            continue
        out.add(family.name + "_total" if family.type == "counter" else family.name)
    return out


def fake_gpu_worker_names() -> set[str]:
    nvml = FakeNVML(gpus=[FakeGPU(memory_used_mb=2048, utilization_pct=40), FakeGPU(uuid="GPU-1")])
    metrics = WorkerMetrics(GPUProbe(nvml=nvml), lambda: [])
    return {n for n in exported_names(metrics.render().decode()) if n.startswith("svllm_gpu_")}


# --------------------------------------------------------------------------- static checks (fast)


def test_dashboards_are_grafana_10_json() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"svllm-fleet", "svllm-traffic", "svllm-engines"}
    uids = set()
    for name, board in load_dashboards().items():
        assert board["uid"] and board["uid"] not in uids, name
        uids.add(board["uid"])
        assert board["schemaVersion"] >= 36 and board["title"] and board["time"]["from"], name
        assert board.get("id") is None, f"{name}: a provisioned dashboard carries no database id"
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert "model" in variables, name
        for v in variables.values():
            assert v["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (name, v["name"])
            assert v["query"]["query"].startswith("label_values(") and v["includeAll"] and v["multi"]
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel, row in panels_in_rows(board):
            grid = panel["gridPos"]
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            if panel["type"] == "row":
                # A repeated row: one copy per value of a variable the dashboard defines.
                assert panel.get("repeat", "") in {"", *variables}, (name, panel["title"])
                continue
            if row is not None and row.get("repeat"):
                # Each copy of a repeated row shows its own value: its panels filter by that variable.
                assert f"${row['repeat']}" in json.dumps(panel["targets"]), (name, panel["title"])
            assert panel["title"] and panel["type"] in {"timeseries", "stat", "table", "bargauge"}
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for t in panel["targets"]:
                assert t["datasource"]["uid"] == "prometheus" and t["expr"].strip() and t["refId"]
            text = json.dumps(panel)
            # Panels filter by the variables the dashboard defines, and no others.
            for used in re.findall(r"\$(?!__)\{?([A-Za-z_]+)", text):
                assert used in variables, (name, panel["title"], used)
    provisioning = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert provisioning["datasources"][0]["uid"] == "prometheus"
    providers = yaml.safe_load((REPO / "grafana/provisioning/dashboards/serverless-vllm.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"


def test_dashboards_cover_the_issue() -> None:
    used = {n for q in queries() for n in metric_names(q.expr)}
    for name in (
        "svllm_worker_state",
        "svllm_worker_heartbeat_age_seconds",
        "svllm_gpu_memory_used_bytes",
        "svllm_gpu_memory_total_bytes",
        "svllm_gpu_utilization_ratio",
        "svllm_model_desired_replicas",
        "svllm_model_replicas",
        "svllm_cold_starts_total",
        "svllm_requests_total",
        "svllm_request_duration_seconds_bucket",
        "svllm_time_to_first_token_seconds_bucket",
        "svllm_router_queued_requests",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_hits_total",
        "svllm_router_prefix_blocks_total",
        "svllm_router_prefix_hit_blocks_total",
        # LoRA adapters (issue 17): loads, load time and unloads per adapter, adapters per replica.
        "svllm_adapter_loads_total",
        "svllm_adapter_load_seconds_total",
        "svllm_adapter_unloads_total",
        "svllm_replica_adapters",
    ):
        assert name in used, f"no panel shows {name}"
    traffic = [q.expr for q in queries() if q.dashboard == "svllm-traffic.json"]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "svllm_time_to_first_token" in e for e in traffic)
    # One row per endpoint kind: a row repeated over the `endpoint` label's values, with rate, latency, time to
    # first token and errors of that kind.
    board = load_dashboards()["svllm-traffic.json"]
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "endpoint"]
    assert variable["query"]["query"] == "label_values(svllm_requests_total, endpoint)"
    per_endpoint = [q.expr for q in queries() if q.dashboard == "svllm-traffic.json" and q.repeat == "endpoint"]
    for name in (
        "svllm_requests_total",
        "svllm_request_duration_seconds_bucket",
        "svllm_time_to_first_token_seconds_bucket",
    ):
        assert any(name in metric_names(e) and 'endpoint=~"$endpoint"' in e for e in per_endpoint), name
    # The label's values are bounded and documented.
    docs = DOCS.read_text()
    assert set(SERVED_ENDPOINTS) <= set(LABELS.values())
    assert not [v for v in sorted(set(LABELS.values())) if f"`{v}`" not in docs], "endpoint labels not documented"


def test_promtool_checks_config_rules_and_rule_tests(promtool: str) -> None:
    rules = sorted(str(p) for p in (REPO / "prometheus" / "rules").glob("*.yml"))
    assert rules
    for args in (
        ["check", "config", "prometheus/prometheus.yml"],
        ["check", "rules", *rules],
        ["test", "rules", *sorted(str(p) for p in (REPO / "prometheus" / "tests").glob("*.yml"))],
    ):
        res = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"
    alerts = {r["alert"] for f in rules for g in yaml.safe_load(Path(f).read_text())["groups"] for r in g["rules"]}
    assert {
        "SvllmWorkerDown",
        "SvllmModelQueuedWithoutReplica",
        "SvllmHighErrorRate",
        "SvllmHeartbeatAgeHigh",
        "SvllmHubUnreachable",
    } <= alerts


def test_gpu_metrics_from_nvml_fake() -> None:
    """The GPU collector against FakeNVML: a stand-in for two GPUs and a driver that cannot exist here."""
    nvml = FakeNVML(
        gpus=[
            FakeGPU(name="NVIDIA H100 80GB HBM3", memory_total_mb=81559, memory_used_mb=2048, utilization_pct=40),
            FakeGPU(name="NVIDIA A10G", uuid="GPU-1", memory_total_mb=23028, utilization_supported=False),
        ]
    )
    text = WorkerMetrics(GPUProbe(nvml=nvml), lambda: []).render().decode()
    samples = {
        (s.name, s.labels["gpu"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("svllm_gpu_")
    }
    mib = 1024 * 1024
    assert samples[("svllm_gpu_memory_total_bytes", "0")] == 81559 * mib
    assert samples[("svllm_gpu_memory_used_bytes", "0")] == 2048 * mib
    assert samples[("svllm_gpu_utilization_ratio", "0")] == pytest.approx(0.40)
    assert samples[("svllm_gpu_memory_used_bytes", "1")] == 0 and samples[("svllm_gpu_utilization_ratio", "1")] == 0
    assert 'gpu_name="NVIDIA A10G"' in text
    # Usage is read at scrape time, not at start-up.
    nvml.gpus[0].memory_used_mb = 4096
    assert 'svllm_gpu_memory_used_bytes{gpu="0"' in WorkerMetrics(GPUProbe(nvml=nvml), lambda: []).render().decode()
    # A CPU-only worker (no NVML library) exports no GPU series at all.
    cpu = WorkerMetrics(GPUProbe(nvml=FakeNVML(init_error=NVML_ERROR_LIBRARY_NOT_FOUND)), lambda: [])
    assert "svllm_gpu_" not in cpu.render().decode()


@dataclass
class FakeEngine:
    replica_id: str
    alias: str
    state: ReplicaState = ReplicaState.STARTING
    restarts: int = 0


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_engine_lifecycle_counters() -> None:
    engines: dict[str, FakeEngine] = {}
    metrics = WorkerMetrics(GPUProbe(nvml=FakeNVML(init_error=NVML_ERROR_LIBRARY_NOT_FOUND)), lambda: engines.values())
    e = engines["r1"] = FakeEngine("r1", "m")
    metrics.engine_started(e)
    text = metrics.render().decode()
    assert sample(text, "svllm_engine_starts_total", model="m") == 1
    assert sample(text, "svllm_engine_crashes_total", model="m") == 0  # present at 0 before any crash
    assert sample(text, "svllm_worker_engines", model="m", state="starting") == 1
    for state in (ReplicaState.READY, ReplicaState.STARTING):  # ready, then a crash while serving
        e.state = state
        metrics.engines_changed(engines.values())
    e.restarts = 1  # the engine restarts itself: counted at the next scrape even before a state change
    text = metrics.render().decode()
    assert sample(text, "svllm_engine_crashes_total", model="m") == 1
    assert sample(text, "svllm_engine_restarts_total", model="m") == 1
    e.state = ReplicaState.READY
    metrics.engines_changed(engines.values())
    f = engines["r2"] = FakeEngine("r2", "m")
    metrics.engine_started(f)
    f.state = ReplicaState.FAILED
    metrics.engines_changed(engines.values())
    text = metrics.render().decode()
    assert sample(text, "svllm_engine_start_duration_seconds_count", model="m") == 2
    assert sample(text, "svllm_engine_start_failures_total", model="m") == 1
    assert sample(text, "svllm_engine_starts_total", model="m") == 2
    assert sample(text, "svllm_worker_engines", model="m", state="failed") == 1
    del engines["r1"], engines["r2"]  # the worker dropped them
    metrics.engines_changed(engines.values())
    assert sample(metrics.render().decode(), "svllm_worker_engines", model="m", state="ready") is None


def test_router_model_label_is_bounded() -> None:
    table = RouteTable()
    table.update(RoutingTable(version=1, epoch="e", models={ALIAS: ModelRoute(state=ModelState.COLD)}))
    metrics = RouterMetrics(lambda: table)
    for alias in (ALIAS, "no-such-model-1", "no-such-model-2", None, 42):
        metrics.observe_request(alias, "chat_completions", 200, 0.1, 0.05)
    metrics.observe_queue_wait(ALIAS, 12.0)
    text = metrics.render().decode()
    models = {s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples if "model" in s.labels}
    assert models == {ALIAS, UNKNOWN_MODEL}
    assert sample(text, "svllm_requests_total", model=UNKNOWN_MODEL, status="200") == 4
    assert sample(text, "svllm_router_queued_requests", model=ALIAS) == 0
    # Series of a routed model exist before its first request (rate() then sees the first one).
    assert sample(text, "svllm_request_duration_seconds_count", model=ALIAS, endpoint="completions") == 0


def test_service_discovery_targets() -> None:
    def worker(wid: str, url: str, state: WorkerState, engines: list[tuple[str, ReplicaState]]) -> WorkerInfo:
        return WorkerInfo(
            worker_id=wid,
            url=url,
            state=state,
            gpus=[],
            cpu_slots=1,
            sleep_supported=False,
            heartbeat_age_s=0.1,
            engines=[EngineStatus(replica_id=rid, alias="m", state=st) for rid, st in engines],
        )

    workers = [
        worker(
            "a",
            "http://10.0.0.1:7000",
            WorkerState.HEALTHY,
            [("m-1", ReplicaState.READY), ("m-2", ReplicaState.STARTING), ("m-3", ReplicaState.SLEEPING)],
        ),
        worker("b", "https://gpu-b.example:8443/svllm/", WorkerState.UNHEALTHY, [("m-4", ReplicaState.READY)]),
        worker("c", "http://10.0.0.3:7000", WorkerState.DEAD, [("m-5", ReplicaState.READY)]),
    ]
    engines = sd.targets(workers, "engines")
    assert engines == [
        {
            "targets": ["10.0.0.1:7000"],
            "labels": {
                "__scheme__": "http",
                "__metrics_path__": "/engines/m-1/metrics",
                "worker": "a",
                "model": "m",
                "replica": "m-1",
            },
        },
        {
            "targets": ["10.0.0.1:7000"],
            "labels": {
                "__scheme__": "http",
                "__metrics_path__": "/engines/m-3/metrics",
                "worker": "a",
                "model": "m",
                "replica": "m-3",
            },
        },
        {
            "targets": ["gpu-b.example:8443"],
            "labels": {
                "__scheme__": "https",
                "__metrics_path__": "/svllm/engines/m-4/metrics",
                "worker": "b",
                "model": "m",
                "replica": "m-4",
            },
        },
    ]
    assert [g["labels"]["worker"] for g in sd.targets(workers, "workers")] == ["a", "b"]


async def test_apps_in_one_process_keep_separate_registries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`svllm up` runs manager, router and worker in one process: three registries, no clash, global untouched."""
    monkeypatch.setenv("SVLLM_AUTH", "off")  # credentials are beside the point here
    from prometheus_client import REGISTRY
    from serverless_vllm.cli import manager_app, router_app, worker_app
    from serverless_vllm.manager.core import ManagerCore

    apps = [
        manager_app(ManagerSettings(db_path=str(tmp_path / "m.db"))),
        router_app(RouterSettings()),
        worker_app(WorkerSettings(log_dir=str(tmp_path / "logs"))),
    ]
    apps.append(manager_app(ManagerSettings(db_path=str(tmp_path / "m2.db"))))  # twice: still no clash
    assert all(any(getattr(r, "path", "") == "/metrics" for r in app.routes) for app in apps)  # type: ignore[attr-defined]
    core = ManagerCore(ManagerSettings(db_path=str(tmp_path / "m3.db")))
    # The method the Ray path relays at the router's /manager/metrics.
    assert b"# TYPE svllm_worker_state gauge" in await core.metrics_text()
    await core.close()
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("svllm_")]


# --------------------------------------------------------------------------- a real Prometheus over a real stack


@pytest.fixture(scope="session")
def promtool() -> str:
    if not shutil.which("promtool") or not shutil.which("prometheus"):
        subprocess.run(["bash", str(REPO / "prometheus" / "install-prometheus.sh")], check=True, timeout=600)
    path = shutil.which("promtool")
    assert path, "promtool is not installed"
    return path


class Prometheus:
    def __init__(self, tmp: Path, head: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(self.test_config(head), sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @staticmethod
    def test_config(head: str) -> dict[str, Any]:
        """The repository's configuration, only pointed at the test's router and made fast."""
        cfg = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
        interval = f"{SCRAPE_S}s"
        cfg["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
        cfg["rule_files"] = [str(REPO / "prometheus" / f) for f in cfg["rule_files"]]
        for job in cfg["scrape_configs"]:
            for static in job.get("static_configs", []):
                static["targets"] = [t.replace("head:8000", head) for t in static["targets"]]
            for sd_cfg in job.get("http_sd_configs", []):
                sd_cfg["url"] = sd_cfg["url"].replace("head:8000", head)
                sd_cfg["refresh_interval"] = interval
        return cfg

    def start(self, prometheus: str) -> Prometheus:
        log = (self.tmp / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.time()
        wait_until(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, 60, what="Prometheus")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self, path: str, **params: Any) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str) -> list[dict[str, Any]]:
        end = time.time()
        return self.api("query_range", query=expr, start=self.started, end=end, step=SCRAPE_S)["result"]

    def has(self, expr: str) -> bool:
        return bool(self.query(expr))


@dataclass
class Observed:
    stack: Stack
    prom: Prometheus
    exported: dict[str, str]  # component -> its /metrics exposition


def _has_values(result: list[dict[str, Any]]) -> bool:
    values = [v for r in result for _, v in (r.get("values") or [r["value"]])]
    return any(not math.isnan(float(v)) for v in values)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, promtool: str) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observability")
    stack = Stack(
        tmp,
        env={
            "SVLLM_AUTH": "on",  # the harness turns it off by default; keys made at run time need it
            "SVLLM_API_KEYS": CLIENT_KEY,
            "SVLLM_ADMIN_KEY": ADMIN_KEY,
            "SVLLM_WORKER_TOKEN": WORKER_TOKEN,
            "SVLLM_MODEL_DIRS": f"{tiny_model.parent},{tmp / 'adapters'}",
            "FAIR_QUEUE": "fair",  # requests of keys pass the fair queue: its wait by priority class has data
        },
    )
    prom: Prometheus | None = None
    t0 = time.monotonic()
    try:
        stack.manager.start()
        stack.router.start()
        stack.add_worker(WORKER)
        prom = Prometheus(tmp, f"127.0.0.1:{stack.router.port}").start(shutil.which("prometheus") or "prometheus")
        wait_until(lambda: prom.has('up{job="svllm-workers", worker="w1"} == 1'), 60, what="worker scraped via SD")
        # Registered cold: the first request waits for the engine, so the cold start path is measured too.
        resp = stack.post(
            "/v1/models/register",
            # Routed by prefix: the router's prefix hit ratio has data beside the engine's prefix cache hit rate.
            json={
                "alias": ALIAS,
                "model_name": str(tiny_model),
                "max_model_len": 512,
                "preload": False,
                "routing": "prefix",
                # LoRA on (vLLM's CPU LoRA path is float32); max_loras 1: adapters in turn unload one another.
                "dtype": "float32",
                "enable_lora": True,
                "max_loras": 1,
                "max_lora_rank": 8,
            },
            headers=ADMIN,
        )
        assert resp.status_code == 200, resp.text
        for seed, adapter in enumerate(ADAPTERS, 1):
            path = make_tiny_lora(tmp / "adapters" / adapter, seed=seed)
            reg = {"alias": adapter, "base": ALIAS, "adapter": str(path), "preload": False}  # loaded by traffic
            assert stack.post("/v1/models/register", json=reg, headers=ADMIN).status_code == 200
        # Counters and histograms of the model are scraped at 0 before anything happens to it.
        for expr in (
            f'svllm_cold_starts_total{{model="{ALIAS}"}}',
            f'svllm_router_queue_wait_seconds_count{{model="{ALIAS}"}}',
            f'svllm_adapter_loads_total{{model="{ADAPTERS[-1]}"}}',
        ):
            wait_until(lambda e=expr: prom.has(e), 30, what=expr)
        log.info("stack and Prometheus up after %.0f s", time.monotonic() - t0)
        drive_traffic(stack)
        drive_adapter_traffic(stack)
        # A key made at run time (tenant `team-a`, 3 requests a minute): the tenants dashboard's traffic.
        made = stack.post(
            "/v1/keys", json={"name": "obs", "tenant": "team-a", "models": [ALIAS], "limits": {"rpm": 3}}, headers=ADMIN
        )
        assert made.status_code in (200, 201), made.text
        drive_key_traffic(stack, made.json()["secret"])
        log.info("cold start and first traffic done after %.0f s", time.monotonic() - t0)
        # The engine is discovered and its vLLM metrics arrive labelled with worker, model and replica.
        wait_until(
            lambda: prom.has(f'vllm:generation_tokens_total{{worker="{WORKER}", model="{ALIAS}"}} > 0'),
            60,
            what="vLLM metrics through service discovery",
        )
        drive_traffic(stack, first=False)  # more traffic now that the engine is scraped: rates see it
        time.sleep(4 * SCRAPE_S)
        log.info("traffic scraped after %.0f s", time.monotonic() - t0)
        exported = {
            name: httpx.get(url, timeout=10).text
            for name, url in (
                ("router", f"{stack.router.url}/metrics"),
                ("manager", f"{stack.manager.url}/metrics"),
                ("worker", f"{stack.workers[WORKER].url}/metrics"),
            )
        }
        yield Observed(stack, prom, exported)
    finally:
        if prom is not None:
            prom.stop()
        stack.stop()


def drive_traffic(stack: Stack, first: bool = True) -> None:
    client = stack.openai(timeout=300, api_key=CLIENT_KEY)
    chat = [{"role": "user", "content": "hello"}]
    for i in range(3):
        if first and i == 0:
            # Held by the router while the model cold-starts.
            assert client.chat.completions.create(model=ALIAS, messages=chat, max_tokens=4).choices
        stream = client.chat.completions.create(model=ALIAS, messages=chat, max_tokens=8, stream=True)
        assert len(list(stream)) >= 2
        assert client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=6).choices
        # A prompt of a few whole blocks (128 characters each), for the router's prefix routing to count.
        assert client.completions.create(model=ALIAS, prompt=LONG_PROMPT, max_tokens=2).choices
        assert list(client.completions.create(model=ALIAS, prompt="abc", max_tokens=6, stream=True))
        time.sleep(SCRAPE_S)
    with pytest.raises(openai.NotFoundError):  # an unknown model: counted as _unknown, 404
        client.chat.completions.create(model="no-such-model", messages=chat, max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # the engine refuses it: counted for the model, 400
        client.chat.completions.create(model=ALIAS, messages=chat, max_tokens=100_000)


def drive_adapter_traffic(stack: Stack) -> None:
    """The adapters in turn on the base's one replica (max_loras 1): each request loads its adapter and unloads
    the other; a scrape apart, so each load and unload is its own increase."""
    client = stack.openai(timeout=300, api_key=CLIENT_KEY)
    for adapter in (*ADAPTERS, ADAPTERS[0]):
        out = client.completions.create(model=adapter, prompt="Once upon a time", max_tokens=6)
        assert out.model == adapter and out.choices
        time.sleep(SCRAPE_S)


def drive_key_traffic(stack: Stack, secret: str) -> None:
    """A stream and a completion (tokens), a request the engine refuses (an error), then one over the key's limit
    of 3 a minute (throttled)."""
    wait_until(  # the key reaches the router with the next key table (long-poll)
        lambda: stack.get("/v1/models", headers={"authorization": f"Bearer {secret}"}).status_code == 200,
        30,
        what="the new key accepted",
    )
    client = stack.openai(timeout=300, api_key=secret)
    chat = [{"role": "user", "content": "hello"}]
    assert len(list(client.chat.completions.create(model=ALIAS, messages=chat, max_tokens=8, stream=True))) >= 2
    assert client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=6).choices
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=ALIAS, messages=chat, max_tokens=100_000)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=ALIAS, prompt="over the limit", max_tokens=2)


def test_targets_discovered_and_up(observed: Observed) -> None:
    targets = observed.prom.api("targets")["activeTargets"]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        by_job.setdefault(t["labels"]["job"], []).append(t)
    assert set(by_job) == {"svllm-head", "svllm-manager", "svllm-workers", "svllm-engines"}
    assert all(t["health"] == "up" for ts in by_job.values() for t in ts), json.dumps(targets, indent=1)
    [engine] = by_job["svllm-engines"]
    replica = observed.stack.get(f"/v1/models/{ALIAS}", headers=CLIENT).json()["replicas"][0]["replica_id"]
    assert {k: engine["labels"][k] for k in ("worker", "model", "replica")} == {
        "worker": WORKER,
        "model": ALIAS,
        "replica": replica,
    }
    assert engine["scrapeUrl"].endswith(f"/engines/{replica}/metrics")
    # Service discovery is the manager's, also reachable through the router; like /metrics it needs no key.
    stack = observed.stack
    assert httpx.get(f"{stack.manager.url}/sd/targets").json() == stack.get("/sd/targets").json()
    assert [g["labels"]["worker"] for g in stack.get("/sd/workers").json()] == [WORKER]
    relayed = stack.get("/manager/metrics")
    assert relayed.status_code == 200 and "svllm_worker_state" in relayed.text


def test_vllm_metrics_labelled_by_worker_and_model(observed: Observed) -> None:
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        result = observed.prom.query(name)
        assert result, f"{name} not in Prometheus"
        assert all(
            r["metric"]["worker"] == WORKER and r["metric"]["model"] == ALIAS and r["metric"]["replica"] for r in result
        ), result


def test_component_metrics_have_the_traffic(observed: Observed) -> None:
    q = observed.prom.query
    statuses = {r["metric"]["status"] for r in q(f'svllm_requests_total{{model="{ALIAS}"}}')}
    assert {"200", "400"} <= statuses
    assert q(f'svllm_requests_total{{model="{UNKNOWN_MODEL}", status="404"}}')
    assert float(q(f'sum(svllm_time_to_first_token_seconds_count{{model="{ALIAS}"}})')[0]["value"][1]) >= 6
    assert float(q(f'svllm_router_queue_wait_seconds_count{{model="{ALIAS}"}}')[0]["value"][1]) >= 1
    assert float(q(f'svllm_cold_starts_total{{model="{ALIAS}"}}')[0]["value"][1]) == 1
    assert float(q(f'svllm_cold_start_duration_seconds_count{{model="{ALIAS}"}}')[0]["value"][1]) == 1
    assert (
        float(q(f'svllm_engine_start_duration_seconds_count{{model="{ALIAS}", worker="{WORKER}"}}')[0]["value"][1]) == 1
    )
    assert q(f'svllm_worker_state{{worker="{WORKER}", state="healthy"}} == 1')
    assert q(f'svllm_model_state{{model="{ALIAS}", state="ready"}} == 1')
    # The adapters in turn at max_loras 1: the first loaded twice (unloaded between), the second once.
    loads = {r["metric"]["model"]: float(r["value"][1]) for r in q("svllm_adapter_loads_total")}
    assert loads == {ADAPTERS[0]: 2, ADAPTERS[1]: 1}
    assert float(q(f'svllm_adapter_unloads_total{{model="{ADAPTERS[0]}"}}')[0]["value"][1]) >= 1
    assert float(q(f'svllm_replica_adapters{{model="{ALIAS}"}}')[0]["value"][1]) == 1
    assert q(f'svllm_replica_info{{model="{ALIAS}", worker="{WORKER}", gpus="cpu", state="ready"}}')
    labels = {k for r in q('{__name__=~"svllm_.*"}') for k in r["metric"]}
    # Bounded labels: no request ids, no paths, nothing per request.
    assert labels <= {
        "__name__",
        "job",
        "instance",
        "worker",
        "model",
        "replica",
        "state",
        "status",
        "endpoint",
        "le",
        "gpu",
        "gpu_name",
        "gpus",
        "appliance",
        "tenant",  # keys made at run time are counted by tenant, never by key
        "priority",  # a key's priority class (the fair queue's waiters)
    }, labels


def variable_values(prom: Prometheus, variable: dict[str, Any]) -> list[str]:
    """The values Grafana lists for a `label_values(selector, label)` variable."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
    assert m, variable["query"]["query"]
    values: list[str] = prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})
    return values


def test_every_panel_returns_data(observed: Observed) -> None:
    prom = observed.prom
    range_s = int(time.time() - prom.started) + 5
    # One model and its adapters ("All" as Grafana expands it), one worker; `endpoint` outside a repeated row as
    # "All" would expand it.
    models = f"({'|'.join([ALIAS, *ADAPTERS])})"
    variables = {"model": models, "worker": WORKER, "endpoint": ".*", "tenant": "team-a"}
    listed = {
        (name, v["name"]): variable_values(prom, v)
        for name, board in load_dashboards().items()
        for v in board["templating"]["list"]
    }
    gpu_names = fake_gpu_worker_names()
    known = set(prom.api("label/__name__/values")) | gpu_names | {"up"}
    empty, unknown = [], []
    for q in queries():
        # A repeated row is checked as Grafana draws it: one copy per value its variable lists, each with data
        # (here chat_completions and completions, both streamed, so time to first token has data too).
        copies: list[dict[str, str]] = [variables]
        if q.repeat:
            values = listed[(q.dashboard, q.repeat)]
            assert values, f"{q.dashboard} / {q.panel}: nothing to repeat over ${q.repeat}"
            copies = [{**variables, q.repeat: value} for value in values]
        for values_of in copies:
            expr = substitute(q.expr, values_of, range_s)
            names = metric_names(expr)
            unknown += [f"{q.dashboard} / {q.panel}: {n}" for n in sorted(names - known)]
            result = prom.query(expr) if q.instant else prom.query_range(expr)  # a rejected query fails here
            if names & gpu_names:
                continue  # no GPU here: the query must parse (above) and read what a GPU worker exports (known)
            if not _has_values(result):
                empty.append(f"{q.dashboard} / {q.panel} [{q.ref}]: {expr}")
    assert not unknown, "panels read metrics nothing exports:\n" + "\n".join(unknown)
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_template_variables_list_the_stack(observed: Observed) -> None:
    expected = {
        "model": sorted([ALIAS, *ADAPTERS]),
        "worker": [WORKER],
        "endpoint": SERVED_ENDPOINTS,
        "tenant": ["team-a"],
    }
    for name, board in load_dashboards().items():
        for v in board["templating"]["list"]:
            values = variable_values(observed.prom, v)
            # The tenants dashboard lists the models keys used (only ALIAS here).
            want = [ALIAS] if (name, v["name"]) == ("svllm-tenants.json", "model") else expected[v["name"]]
            assert values == want, (name, v["name"], values)


def test_every_exported_metric_is_shown_or_documented(observed: Observed) -> None:
    corpus = "\n".join(p.read_text() for p in DASHBOARDS) + DOCS.read_text()
    exported = set().union(*(exported_names(text) for text in observed.exported.values())) | fake_gpu_worker_names()
    ours = {n for n in exported if n.startswith("svllm_")}
    assert len(ours) >= 20, ours
    missing = sorted(n for n in ours if not documented_or_used(n, corpus))
    assert not missing, f"exported but neither in a dashboard nor in {DOCS.name}: {missing}"
    # And the other way round: what the docs name is real.
    documented = set(re.findall(r"`(svllm_[a-z0-9_]+)", DOCS.read_text()))
    stale = sorted(n for n in documented if n not in ours and re.sub(r"_(bucket|sum|count)$", "", n) not in ours)
    assert not stale, f"{DOCS.name} names metrics nothing exports: {stale}"


def test_alert_rules_load_and_evaluate(observed: Observed) -> None:
    groups = observed.prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 4
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # A healthy stack that just served: nothing fires.
    assert not [r["name"] for r in rules if r["state"] == "firing"]
