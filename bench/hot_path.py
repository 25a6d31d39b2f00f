"""Router overhead on the hot path and streaming fidelity (issues 8.1 and 8.2).

The same CPU vLLM engine(s), the same load, four ways in:
  direct       client -> engine
  ours_http    client -> `svllm router` -> `svllm worker` -> engine           (plain HTTP deployment)
  ours_hybrid  client -> router replica (Serve direct ingress) -> worker -> engine  (`svllm ray-services`)
  rust         client -> `vllm-router` (PyPI, Rust) -> engine                  (--policy power_of_two)

All four are up at once and are measured in interleaved rounds (the order rotates each round), so slow phases
of a noisy machine hit every configuration alike; the summary takes the median over rounds. How one engine
serves both of our deployments: the worker's MANAGER_URL names a local TCP forwarder. It first registers with
the HTTP manager, whose router learns the engine; the forwarder then moves to the Ray Serve router and the worker
registers again with the manager actor, which adopts the running engine (no restart). The HTTP manager runs with
a very long HEARTBEAT_TIMEOUT, so it keeps the worker healthy in its table. The hot path of each router is the
real one; only the control plane is shared in this unusual way.

Load: non-streaming completions (8 output tokens, ignore_eos) with `hey` (Debian package, Go) at concurrency
1, 8, 32; streaming (16 output tokens) with vLLM's own benchmark client (vllm.benchmarks.serve) for TTFT and
inter-token latency; chunk gaps as the client sees them with a small httpx client (64 tokens, concurrency 1).
CPU time of every process (router, worker, engine, Ray, Rust router, client) is read from /proc around each
non-streaming run: CPU milliseconds per request is the overhead that matters on a CPU-bound machine. With
`--stream-cpu-requests N`, also N streams (8 at a time) through ours_http and ours_http_base per round with the
router's and worker's CPU per streamed event (what relaying one event costs, less noisy than a throughput).

    .venv/bin/python bench/hot_path.py --quick           # smoke run, about 4 minutes
    .venv/bin/python bench/hot_path.py                   # the full run (waits for a quiet machine first)

A/B against an older checkout, in the same run: `--baseline-tree DIR` starts a second complete plain-HTTP stack
(its own manager, router, worker and engine: the stand-in with --fake-engine) whose processes run DIR's code
(`python -m serverless_vllm.cli` with PYTHONPATH=DIR/services first, which shadows the editable install). Its
router is the config ours_http_base, measured in the same interleaved rounds; its processes are metered as
router_base, worker_base, manager_base, engine_base. The summary's "ab" gives, per concurrency, ours_http /
ours_http_base requests per second paired within each round and their median (results: hot_path_ab*.json):

    git worktree add /tmp/baseline-tree <commit>
    .venv/bin/python bench/hot_path.py --fake-engine --no-hybrid --no-rust --baseline-tree /tmp/baseline-tree
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from common import (
    ROOT,
    RUST_ROUTER,
    SVLLM,
    VENV_BIN,
    CPUMeter,
    Procs,
    RayCluster,
    SwitchableForwarder,
    auth_env,
    base_env,
    cmdline,
    descendants,
    free_port,
    git_state,
    http_ok,
    log,
    median,
    pids_matching,
    ratio,
    result_header,
    summary,
    svllm_from_tree,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)

ALIAS = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 2
NAMESPACE = "svllm-bench"
FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm"


# --------------------------------------------------------------------------- the setup


class Setup:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Procs("hot")
        self.tmp = self.procs.tmp
        auth, self.client_key = auth_env()
        self.admin = {"authorization": f"Bearer {auth['SVLLM_ADMIN_KEY']}"}
        self.headers = {"authorization": f"Bearer {self.client_key}"}
        self.env = {**base_env(self.tmp), **auth}
        self.urls: dict[str, str] = {}
        self.pids: dict[str, Any] = {}
        self.engine_ports: list[int] = []
        self.cluster: RayCluster | None = None
        self.forwarder: SwitchableForwarder | None = None
        self.base_engine_ports: list[int] = []
        self.baseline: dict[str, Any] | None = None  # --baseline-tree: what svllm_from_tree checked

    def start(self) -> None:
        a = self.args
        model = tiny_model(self.tmp)
        self.urls["ours_http"], self.engine_ports, mport = self._start_http_stack("", [SVLLM], self.env, {}, model)
        if a.replicas == 1:
            self.urls["direct"] = f"http://127.0.0.1:{self.engine_ports[0]}"
        if a.baseline_tree:
            self._start_baseline(model)

        for variant in a.extra_router or []:
            self._start_extra_router(variant, mport)
        if not a.no_rust:
            self._start_rust()
        if not a.no_hybrid:
            self._start_hybrid(model)

    def _start_http_stack(
        self,
        suffix: str,
        cli: list[str],
        env: dict[str, str],
        pythonpath: dict[str, str],
        model: Path,
    ) -> tuple[str, list[int], int]:
        """A plain-HTTP deployment (`svllm manager`, `svllm router`, `svllm worker`) run as `cli`, with the
        model registered through its router and its engine(s) ready; its processes are metered as manager,
        router, worker (+ suffix). Returns the router's URL, the engines' ports and the manager's port.
        The product's own stack (no suffix) reaches its manager through the forwarder (see the module doc)."""
        a = self.args
        mport, rport, wport = free_port(), free_port(), free_port()
        tag = suffix.replace("_", "-")
        # The HTTP manager keeps the worker healthy after it moves to the manager actor (see the module doc).
        manager = self.procs.start(
            f"manager{tag}",
            [*cli, "manager", "--host", "127.0.0.1", "--port", str(mport)],
            {**env, **pythonpath, "HEARTBEAT_TIMEOUT": "1000000"},
        )
        wait_until(lambda: manager.check() or http_ok(f"http://127.0.0.1:{mport}/health"), 60, what=f"manager{tag}")
        router = self.procs.start(
            f"router{tag}",
            [
                *cli,
                "router",
                "--host",
                "127.0.0.1",
                "--port",
                str(rport),
                "--manager-url",
                f"http://127.0.0.1:{mport}",
            ],
            {**env, **pythonpath},
        )
        wait_until(lambda: router.check() or http_ok(f"http://127.0.0.1:{rport}/health"), 60, what=f"router{tag}")
        manager_url = f"http://127.0.0.1:{mport}"
        if not suffix:
            self.forwarder = SwitchableForwarder(("127.0.0.1", mport)).start()
            self.procs.cleanups.append(self.forwarder.stop)
            manager_url = self.forwarder.url
        worker_env = {**env, "CPU_SLOTS": str(a.replicas), **pythonpath}
        if a.fake_engine:
            # The worker's engine command imports bench/fake_vllm instead of vLLM (see its docstring).
            paths = [p for p in (pythonpath.get("PYTHONPATH"), str(FAKE_VLLM)) if p]
            worker_env.update(PYTHONPATH=os.pathsep.join(paths), FAKE_TOKEN_INTERVAL_MS=str(a.fake_interval_ms))
        worker = self.procs.start(
            f"worker{tag}",
            [
                *cli,
                "worker",
                "--worker-id",
                f"bench{tag}-w1",
                "--host",
                "127.0.0.1",
                "--port",
                str(wport),
                "--manager-url",
                manager_url,
                "--public-url",
                f"http://127.0.0.1:{wport}",
            ],
            worker_env,
        )
        wait_until(lambda: worker.check() or http_ok(f"http://127.0.0.1:{wport}/health"), 60, what=f"worker{tag}")
        url = f"http://127.0.0.1:{rport}"
        self.pids.update(
            {f"manager{suffix}": manager.pid, f"router{suffix}": router.pid, f"worker{suffix}": worker.pid}
        )
        spec = {
            "alias": ALIAS,
            "model_name": str(model),
            "max_model_len": 512,
            "min_replicas": a.replicas,
            "max_replicas": a.replicas,
            "idle_timeout_s": 7 * 24 * 3600,
            "preload": True,
        }
        resp = httpx.post(f"{url}/v1/models/register", json=spec, headers=self.admin, timeout=60)
        resp.raise_for_status()
        log(f"waiting for the engine(s) of router{tag} to start")
        t0 = time.monotonic()
        wait_until(lambda: self._ready(url, a.replicas), 900, interval=1, what=f"engines ready (router{tag})")
        log(f"engine(s) ready after {time.monotonic() - t0:.0f} s")
        workers = httpx.get(f"{url}/workers", headers=self.admin, timeout=10).json()
        return url, [e["port"] for w in workers for e in w["engines"]], mport

    def _start_baseline(self, model: Path) -> None:
        """The same plain-HTTP deployment once more, its own manager, router, worker and engine(s), running the
        code of another checkout (`--baseline-tree`): config ours_http_base, processes *_base."""
        tree = Path(self.args.baseline_tree)
        cli, self.baseline = svllm_from_tree(tree)
        log(f"starting the baseline stack from {self.baseline['tree']} (commit {self.baseline['commit']})")
        base = self.tmp / "base"
        base.mkdir()
        env = {**self.env, "MANAGER_DB": str(base / "manager.db"), "SVLLM_STATE_DIR": str(base / "state")}
        pythonpath = {"PYTHONPATH": str(Path(self.baseline["tree"]) / "services")}
        self.urls["ours_http_base"], self.base_engine_ports, _ = self._start_http_stack(
            "_base", cli, env, pythonpath, model
        )

    def _ready(self, url: str, replicas: int) -> bool:
        info = httpx.get(f"{url}/v1/models/{ALIAS}", headers=self.headers, timeout=10).json()
        if info.get("last_error") and info["state"] == "failed":
            raise RuntimeError(f"model failed: {info['last_error']}")
        return info["state"] == "ready" and sum(r["state"] == "ready" for r in info["replicas"]) >= replicas

    def _start_extra_router(self, variant: str, mport: int) -> None:
        """A second router process with the same app and one thing changed, next to the product's own:
        `asyncio` (served on asyncio's own event loop and h11, instead of the default uvloop and httptools)."""
        port = free_port()
        code = (
            "import uvicorn; from serverless_vllm.cli import router_app; "
            "from serverless_vllm.config import RouterSettings; "
            f"s = RouterSettings.from_env(host='127.0.0.1', port={port}, manager_url='http://127.0.0.1:{mport}'); "
            f"uvicorn.Server(uvicorn.Config(router_app(s), host='127.0.0.1', port={port}, log_level='warning', "
            "access_log=False, loop='asyncio', http='h11')).run()"
        )
        router = self.procs.start(f"router-{variant}", [sys.executable, "-c", code], self.env)
        wait_until(lambda: router.check() or http_ok(f"http://127.0.0.1:{port}/health"), 60, what=f"router {variant}")
        self.urls[f"ours_http_{variant}"] = f"http://127.0.0.1:{port}"
        self.pids[f"router_{variant}"] = router.pid

    def _start_rust(self) -> None:
        if not RUST_ROUTER.exists():
            raise SystemExit(f"{RUST_ROUTER} missing: run `bash bench/setup.sh` first")
        port = free_port()
        rust = self.procs.start(
            "vllm-router",
            [
                str(RUST_ROUTER),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--policy",
                # Its power_of_two refuses a single worker; with one engine every policy sends it everything.
                "power_of_two" if len(self.engine_ports) > 1 else "round_robin",
                "--worker-urls",
                *[f"http://127.0.0.1:{p}" for p in self.engine_ports],
                "--prometheus-port",
                str(free_port()),
                "--prometheus-host",
                "127.0.0.1",
                "--log-level",
                "warning",
            ],
        )
        wait_until(lambda: rust.check() or http_ok(f"http://127.0.0.1:{port}/health"), 120, what="vllm-router")
        self.urls["rust"] = f"http://127.0.0.1:{port}"
        self.pids["rust"] = rust.pid

    def _start_hybrid(self, model: Path) -> None:
        assert self.forwarder is not None
        log("starting a private Ray cluster and `svllm ray-services`")
        self.cluster = RayCluster(self.procs).start()
        self.procs.cleanups.append(self.cluster._kill_leftovers)
        sport = free_port()
        env = {**self.env, "MANAGER_DB": str(self.tmp / "ray-manager.db"), "HEARTBEAT_TIMEOUT": "30"}
        deploy = subprocess.run(
            [
                SVLLM,
                "ray-services",
                "--address",
                self.cluster.address,
                "--namespace",
                NAMESPACE,
                "--host",
                "127.0.0.1",
                "--port",
                str(sport),
                "--proxy-port",
                str(free_port()),
                "--ingress",
                self.args.hybrid_ingress,
                "--replicas",
                "1",
                "--detach",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if deploy.returncode != 0:
            raise RuntimeError(f"ray-services failed: {deploy.stdout[-2000:]}{deploy.stderr[-4000:]}")
        url = f"http://127.0.0.1:{sport}"
        wait_until(lambda: http_ok(f"{url}/health"), 120, what="Serve router")
        # Same spec, no preload: the actor places nothing; it adopts the engine when the worker registers.
        spec = {
            "alias": ALIAS,
            "model_name": str(model),
            "max_model_len": 512,
            "min_replicas": 0,
            "max_replicas": self.args.replicas,
            "idle_timeout_s": 7 * 24 * 3600,
            "preload": False,
        }
        httpx.post(f"{url}/v1/models/register", json=spec, headers=self.admin, timeout=60).raise_for_status()
        self.forwarder.switch(("127.0.0.1", sport))
        wait_until(lambda: self._ready(url, self.args.replicas), 120, interval=1, what="engine adopted by the actor")
        self.urls["ours_hybrid"] = url
        log("the manager actor adopted the running engine(s)")

    # ------------------------------------------------------------------ processes to meter

    def cpu_groups(self) -> dict[str, Any]:
        engines = lambda: {p for port in self.engine_ports for p in _engine_tree(port)}  # noqa: E731
        groups: dict[str, Any] = {
            "engine": engines,
            "router": lambda: [self.pids["router"]],
            "worker": lambda: [self.pids["worker"]],
            "manager": lambda: [self.pids["manager"]],
        }
        if self.base_engine_ports:  # --baseline-tree: the second plain-HTTP stack
            groups["engine_base"] = lambda: {p for port in self.base_engine_ports for p in _engine_tree(port)}
            groups["worker_base"] = lambda: [self.pids["worker_base"]]
            groups["manager_base"] = lambda: [self.pids["manager_base"]]
        if "rust" in self.pids:
            groups["rust"] = lambda: [self.pids["rust"]]
        for key in [k for k in self.pids if k.startswith("router_")]:
            groups[key] = lambda key=key: [self.pids[key]]
        if self.cluster is not None:
            groups["ray"] = self.cluster.pids
        return groups

    def stop(self) -> None:
        self.procs.stop_all()


def _engine_tree(port: int) -> set[int]:
    roots = []
    for pid in pids_matching("vllm.entrypoints.openai.api_server"):
        args = cmdline(pid).split()
        if "--port" in args and args[args.index("--port") + 1] == str(port):
            roots.append(pid)
    return {p for r in roots for p in {r, *descendants(r)}}


# --------------------------------------------------------------------------- non-streaming: hey


def body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": ALIAS,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def run_hey(
    url: str, headers: dict[str, str], concurrency: int, duration_s: float, body_path: Path, meter: CPUMeter | None
) -> dict[str, Any]:
    cmd = [
        "hey",
        "-z",
        f"{duration_s}s",
        "-c",
        str(concurrency),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body_path),
        "-o",
        "csv",
        "-t",
        "60",
    ]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(f"{url}/v1/completions")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if meter:
        meter.start()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=duration_s + 120)
    cpu = meter.stop() if meter else {}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # hey, reaped by communicate()
    cpu["client"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    lat, ok, bad, end = [], 0, 0, 0.0
    for row in csv.DictReader(io.StringIO(out.decode())):
        if row["status-code"] == "200":
            ok += 1
            lat.append(float(row["response-time"]))
        else:
            bad += 1
        end = max(end, float(row["offset"]) + float(row["response-time"]))
    if not lat:
        raise RuntimeError(f"hey got no answer from {url}: {err.decode()[-500:]}")
    return {
        "ok": ok,
        "errors": bad,
        "rps": round(ok / end, 2) if end else None,
        "latency_ms": summary(lat, 1000.0),
        "cpu_s": cpu,
    }


# --------------------------------------------------------------------------- streaming: vLLM's client


def vllm_bench_runs(
    setup: Setup, label: str, concurrency: int, prompts: int, output_len: int, model: Path
) -> dict[str, Any]:
    return {
        "label": label,
        "args": [
            "--backend",
            "openai",
            "--base-url",
            setup.urls[label.split("|")[0]],
            "--endpoint",
            "/v1/completions",
            "--model",
            ALIAS,
            "--tokenizer",
            str(model),
            "--dataset-name",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            str(output_len),
            "--ignore-eos",
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(concurrency),
            "--request-rate",
            "inf",
            "--disable-tqdm",
            "--num-warmups",
            "0",
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,99",
            "--ready-check-timeout-sec",
            "0",
            "--header",
            f"authorization=Bearer {setup.client_key}",
        ],
    }


def run_vllm_bench(runs: list[dict[str, Any]], tmp: Path, timeout: float) -> list[dict[str, Any]]:
    runs_path, out_path = tmp / "vllm-bench-runs.json", tmp / "vllm-bench-out.json"
    runs_path.write_text(json.dumps(runs))
    out_path.unlink(missing_ok=True)
    with open(tmp / "vllm-bench.log", "ab") as logf:
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("vllm_bench_runner.py")), str(runs_path), str(out_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=True,
        )
    return json.loads(out_path.read_text())


# --------------------------------------------------------------------------- chunk gaps: our own client


def completion_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], payload: bytes) -> Any:
    """One streaming completion request (an async context manager giving the response)."""
    return client.stream(
        "POST", f"{url}/v1/completions", content=payload, headers={**headers, "content-type": "application/json"}
    )


async def chunk_gaps(url: str, headers: dict[str, str], requests: int, max_tokens: int) -> dict[str, Any]:
    """Sequential streaming requests; each SSE event is timed when the read that completes it arrives."""
    gaps: list[float] = []
    ttft: list[float] = []
    events_per_response: list[int] = []
    reads = 0
    events_total = 0
    payload = json.dumps(body(max_tokens, stream=True)).encode()
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(requests):
            t0 = time.perf_counter()
            times: list[float] = []
            buf = b""
            async with completion_stream(client, url, headers, payload) as resp:
                resp.raise_for_status()
                async for chunk in resp.aiter_raw():
                    now = time.perf_counter()
                    reads += 1
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        if event.strip() and event.strip() != b"data: [DONE]":
                            times.append(now)
            events_total += len(times)
            events_per_response.append(len(times))
            if times:
                ttft.append(times[0] - t0)
                gaps.extend(b - a for a, b in itertools.pairwise(times))
    return {
        "requests": requests,
        "events_per_response": summary(events_per_response),
        "events_per_read": round(events_total / max(1, reads), 3),
        "gap_ms": summary(gaps, 1000.0),
        "ttft_ms": summary(ttft, 1000.0),
    }


# --------------------------------------------------------------------------- streaming CPU: our own client


async def stream_events(url: str, headers: dict[str, str], concurrency: int, requests: int, max_tokens: int) -> int:
    """`requests` streaming completions, `concurrency` at a time; returns the SSE events received."""
    payload = json.dumps(body(max_tokens, stream=True)).encode()
    events = 0
    todo = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal events
        for _ in todo:
            async with completion_stream(client, url, headers, payload) as resp:
                resp.raise_for_status()
                async for chunk in resp.aiter_raw():
                    events += chunk.count(b"\n\n")

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return events


def stream_cpu(setup: Setup, meter: CPUMeter, cfg: str, concurrency: int, requests: int, tokens: int) -> dict[str, Any]:
    """CPU microseconds per streamed event of each metered process group while `cfg` relays streams: what relaying
    one event costs (router, worker), with less noise than a throughput on a busy machine."""
    meter.start()
    events = asyncio.run(stream_events(setup.urls[cfg], setup.headers, concurrency, requests, tokens))
    cpu = meter.stop()
    per_event = {k: round(1e6 * v / max(1, events), 2) for k, v in cpu.items() if k != "wall_s" and v}
    return {"config": cfg, "events": events, "wall_s": cpu["wall_s"], "cpu_us_per_event": per_event}


def summarise_stream_cpu(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of router (+ worker) CPU per event; with --baseline-tree, ours_http / ours_http_base paired
    by round (the router and worker of each are metered as router, worker and router_base, worker_base)."""

    def router_us(run: dict[str, Any]) -> float:
        cpu = run["cpu_us_per_event"]
        return float(cpu.get("router_base", 0) if run["config"] == "ours_http_base" else cpu.get("router", 0))

    out: dict[str, Any] = {}
    for cfg in ("ours_http", "ours_http_base"):
        mine = [r for r in runs if r["config"] == cfg]
        if mine:
            out[cfg] = {"router_cpu_us_per_event": median([router_us(r) for r in mine])}
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for r in runs:
        by_round[r["round"]][r["config"]] = router_us(r)
    ratios = [ratio(v["ours_http"], v["ours_http_base"]) for v in by_round.values() if len(v) == 2]
    if ratios:
        out["router_cpu_ratio_by_round"] = ratios
        out["router_cpu_ratio_median"] = median(ratios)
    return out


# --------------------------------------------------------------------------- profiling


def profile(setup: Setup, body_path: Path, concurrency: int, seconds: int) -> dict[str, Any]:
    """py-spy on the router and the worker while `hey` drives ours_http, and on the hybrid router replica while it
    drives ours_hybrid; the top frames by own and total time."""
    out: dict[str, Any] = {}
    targets = [("router", setup.pids["router"], "ours_http"), ("worker", setup.pids["worker"], "ours_http")]
    if "ours_http_base" in setup.urls:
        targets += [
            ("router_base", setup.pids["router_base"], "ours_http_base"),
            ("worker_base", setup.pids["worker_base"], "ours_http_base"),
        ]
    if "ours_hybrid" in setup.urls:
        # The replica's router_id ends with its pid (serve_app.py).
        router_id = httpx.get(f"{setup.urls['ours_hybrid']}/health", timeout=10).json()["router_id"]
        targets.append(("hybrid_replica", int(router_id.rsplit("-", 1)[1]), "ours_hybrid"))
    for name, pid, config in targets:
        raw = setup.tmp / f"profile-{name}.txt"
        url = setup.urls[config]
        out[name] = spy(
            pid, seconds, raw, partial(run_hey, url, setup.headers, concurrency, seconds - 2, body_path, None)
        )
    return out


def spy(pid: int, seconds: int, raw: Path, drive: Callable[[], Any]) -> dict[str, Any]:
    """py-spy on `pid` for `seconds` while `drive()` loads it (started a second in); its top frames."""
    spy = subprocess.Popen(
        [
            str(VENV_BIN / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    drive()
    spy.wait(60)
    return top_frames(raw)


def top_frames(raw: Path, n: int = 25) -> dict[str, Any]:
    """Collapsed stacks (`a;b;c count`) -> share of samples per frame: own (leaf) and total (anywhere)."""
    own: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    by_file: dict[str, int] = defaultdict(int)
    samples = 0
    if not raw.exists():
        return {"error": "no profile written"}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        if any("select" in f and "selectors.py" in f for f in frames[-2:]) or "epoll" in frames[-1]:
            continue  # idle in the event loop's poll: not work
        samples += c
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
        # Which library the leaf frame lives in (own time by package).
        leaf = frames[-1]
        path = leaf[leaf.find("(") + 1 : leaf.rfind(")")] if "(" in leaf else leaf
        by_file[_package(path)] += c

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / samples, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    categories: dict[str, int] = defaultdict(int)
    for frame, c in own.items():
        categories[_category(frame)] += c
    return {
        "busy_samples": samples,
        "own_by_category_pct": share(categories),
        "own_pct": share(own),
        "total_pct": share(total),
        "own_by_package_pct": share(by_file),
    }


_CATEGORIES = (
    ("socket writes (kernel: loopback TCP send)", ("_SelectorSocketTransport.write", "UVStream.write")),
    (
        "HTTP client (serverless_vllm.dataplane.http1 for the relay; httpx for control)",
        ("serverless_vllm/dataplane/http1", "aiohttp/", "multidict/", "yarl/", "httpx/", "httpcore/", "h11/"),
    ),
    (
        "HTTP server and framework (uvicorn, starlette, fastapi, anyio)",
        ("uvicorn/", "starlette/", "fastapi/", "anyio/", "serverless_vllm/dataplane/server_protocol"),
    ),
    ("Ray Serve and Ray (replica bookkeeping, metrics, core worker)", ("ray/",)),
    ("serverless_vllm (router, worker, auth, metrics)", ("serverless_vllm/", "auth.py", "inference.py")),
    ("event loop (asyncio)", ("asyncio/",)),
)


def _category(frame: str) -> str:
    for name, needles in _CATEGORIES:
        if any(n in frame for n in needles):
            return name
    return "other (stdlib, json, enum, socket objects)"


def _package(path: str) -> str:
    for marker in ("site-packages/", "serverless_vllm/", "lib/python3"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return ("serverless_vllm/" if marker == "serverless_vllm/" else "") + rest.split("/")[0].split(".py")[0]
    return path.split(":")[0]


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one short round")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, help="seconds per non-streaming run (default 8, quick 2)")
    p.add_argument("--max-tokens", type=int, default=8, help="output tokens of non-streaming requests")
    p.add_argument("--stream-tokens", type=int, default=16, help="output tokens of streaming requests")
    p.add_argument("--replicas", type=int, default=1, help="engines behind every router (direct needs 1)")
    p.add_argument("--no-hybrid", action="store_true")
    p.add_argument(
        "--hybrid-ingress",
        choices=("direct", "proxy"),
        default="direct",
        help="how requests reach the hybrid router replica (svllm ray-services --ingress)",
    )
    p.add_argument("--no-rust", action="store_true")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the router, the worker and the hybrid router replica at the top concurrency",
    )
    p.add_argument(
        "--fake-engine",
        action="store_true",
        help="an instant stand-in for vLLM behind every path (bench/fake_vllm): the proxies' own cost",
    )
    p.add_argument("--fake-interval-ms", type=float, default=10.0, help="token interval of the stand-in's streams")
    p.add_argument(
        "--stream-cpu-requests",
        type=int,
        default=0,
        help="per round, this many streams (--stream-tokens each, 8 at a time) through ours_http and ours_http_base "
        "with the router's and worker's CPU per event metered (0: none)",
    )
    p.add_argument(
        "--extra-router",
        action="append",
        choices=("asyncio",),
        help="also measure a router variant (config ours_http_<variant>): served on asyncio's own loop "
        "and h11 instead of uvloop and httptools",
    )
    p.add_argument(
        "--baseline-tree",
        metavar="DIR",
        help="A/B against another checkout (e.g. `git worktree add /tmp/baseline-tree <commit>`): a second "
        "plain-HTTP stack (manager, router, worker, engine) running DIR's code, config ours_http_base",
    )
    p.add_argument("--wait-quiet", type=float, help="seconds to wait for a quiet machine (default 2400, quick 0)")
    p.add_argument("--out", default=None, help="results name (default hot_path[_ab][_fake][_quick])")
    a = p.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    duration = a.duration or (2.0 if a.quick else 8.0)
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    stream_prompts = {c: max(10, c * (3 if a.quick else 12)) for c in concurrencies}
    gap_requests = 3 if a.quick else 15
    name = a.out or (
        "hot_path"
        + ("_ab" if a.baseline_tree else "")
        + ("_fake" if a.fake_engine else "")
        + ("_quick" if a.quick else "")
    )

    setup = Setup(a)
    result: dict[str, Any] = {
        **result_header("hot_path"),
        "settings": {
            "rounds": rounds,
            "duration_s": duration,
            "concurrency": concurrencies,
            "max_tokens": a.max_tokens,
            "stream_tokens": a.stream_tokens,
            "stream_prompts": stream_prompts,
            "gap_requests": gap_requests,
            "replicas": a.replicas,
            "hybrid_ingress": a.hybrid_ingress,
            "auth": "on (ours); none (direct, rust)",
            "engine": (
                f"fake (instant, {a.fake_interval_ms} ms per streamed token)"
                if a.fake_engine
                else "vLLM CPU, tiny model"
            ),
        },
    }
    try:
        setup.start()
        if setup.baseline is not None:
            result["settings"]["baseline"] = setup.baseline
            result["settings"]["ours"] = git_state(ROOT)
        configs = [
            c
            for c in ("direct", "ours_http", "ours_http_base", "ours_http_asyncio", "ours_hybrid", "rust")
            if c in setup.urls
        ]
        result["configs"] = configs
        body_path = setup.tmp / "body.json"
        body_path.write_text(json.dumps(body(a.max_tokens)))
        # Warm every path (connection pools, first-request work in the engine).
        for cfg in configs:
            run_hey(setup.urls[cfg], setup.headers, 4, 1.0, body_path, None)
        result["quiet"] = wait_for_quiet(
            a.wait_quiet if a.wait_quiet is not None else (0 if a.quick else 2400), own_marker=str(setup.tmp)
        )
        meter = CPUMeter(setup.cpu_groups())
        model = setup.tmp / "models" / "tiny"
        nonstream: list[dict[str, Any]] = []
        stream: list[dict[str, Any]] = []
        gaps: list[dict[str, Any]] = []
        stream_cpu_runs: list[dict[str, Any]] = []
        for r in range(rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for c in concurrencies:
                for cfg in order:
                    res = run_hey(setup.urls[cfg], setup.headers, c, duration, body_path, meter)
                    nonstream.append({"round": r, "config": cfg, "concurrency": c, **res})
                    log(
                        f"round {r} c={c} {cfg}: p50 {res['latency_ms']['p50']:.1f} ms, p99 "
                        f"{res['latency_ms']['p99']:.1f} ms, {res['rps']} req/s, load {os.getloadavg()[0]:.2f}"
                    )
            if not a.no_stream:
                runs = [
                    vllm_bench_runs(setup, f"{cfg}|{c}", c, stream_prompts[c], a.stream_tokens, model)
                    for c in concurrencies
                    for cfg in order
                ]
                for item in run_vllm_bench(runs, setup.tmp, timeout=1800):
                    cfg, c = item["label"].split("|")
                    stream.append({"round": r, "config": cfg, "concurrency": int(c), **item["result"]})
                for cfg in order:
                    if cfg in ("ours_http", "ours_http_base") and a.stream_cpu_requests:
                        res = stream_cpu(setup, meter, cfg, 8, a.stream_cpu_requests, a.stream_tokens)
                        stream_cpu_runs.append({"round": r, **res})
                        log(f"round {r} stream CPU {cfg}: {res['cpu_us_per_event']} us/event, {res['events']} events")
                for cfg in order:
                    g = asyncio.run(chunk_gaps(setup.urls[cfg], setup.headers, gap_requests, 64))
                    gaps.append({"round": r, "config": cfg, **g})
                    log(
                        f"round {r} chunk gaps {cfg}: p50 {g['gap_ms']['p50']} ms, p99 {g['gap_ms']['p99']} ms, "
                        f"{g['events_per_read']} events/read"
                    )
            result["loadavg_after_round_" + str(r)] = list(os.getloadavg())
        result["nonstream_runs"], result["stream_runs"], result["gap_runs"] = nonstream, stream, gaps
        result["summary"] = summarise(configs, concurrencies, nonstream, stream, gaps)
        if stream_cpu_runs:
            result["stream_cpu_runs"] = stream_cpu_runs
            result["summary"]["stream_cpu"] = summarise_stream_cpu(stream_cpu_runs)
            log(f"stream CPU: {result['summary']['stream_cpu']}")
        for c, v in result["summary"].get("ab", {}).get("nonstream", {}).items():
            log(
                f"A/B c={c}: ours_http {v['ours_http_rps']} req/s, ours_http_base {v['ours_http_base_rps']} req/s; "
                f"ours/base paired by round {v['rps_ratio_by_round']}, median {v['rps_ratio_paired_median']}; "
                f"router+worker CPU ms/request {v['router_worker_cpu_ms_per_request']}"
            )
        if a.profile:
            log("profiling router and worker with py-spy")
            result["profile"] = profile(setup, body_path, max(concurrencies), 12 if not a.quick else 5)
    finally:
        result["loadavg_end"] = list(os.getloadavg())
        setup.stop()
    write_result(name, result)
    print(json.dumps(result.get("summary", {}), indent=1))


def summarise(
    configs: list[str],
    concurrencies: list[int],
    nonstream: list[dict[str, Any]],
    stream: list[dict[str, Any]],
    gaps: list[dict[str, Any]],
) -> dict[str, Any]:
    """Median over rounds of each run's statistic; ratios against direct and against the Rust router, and with
    --baseline-tree ours_http against ours_http_base (the A/B, also gathered under "ab")."""
    out: dict[str, Any] = {"nonstream": {}, "stream": {}, "chunk_gaps": {}}
    for c in concurrencies:
        rows: dict[str, dict[str, Any]] = {}
        for cfg in configs:
            runs = [r for r in nonstream if r["config"] == cfg and r["concurrency"] == c]
            if not runs:
                continue
            n = sum(r["ok"] for r in runs)
            cpu_ms = {
                k: round(1000 * median([r["cpu_s"].get(k, 0) / max(1, r["ok"]) for r in runs]), 3)
                for k in runs[0]["cpu_s"]
                if k != "wall_s"
            }
            rows[cfg] = {
                "p50_ms": median([r["latency_ms"]["p50"] for r in runs]),
                "p99_ms": median([r["latency_ms"]["p99"] for r in runs]),
                "rps": median([r["rps"] for r in runs]),
                "requests": n,
                "errors": sum(r["errors"] for r in runs),
                "cpu_ms_per_request": cpu_ms,
            }
        _ratios(rows, ("p50_ms", "p99_ms", "rps"))
        _paired_rps_ratios(rows, [r for r in nonstream if r["concurrency"] == c], "rps")
        _paired_rps_ratios(rows, [r for r in nonstream if r["concurrency"] == c], "rps", *BASE_PAIR)
        out["nonstream"][str(c)] = rows
        srows: dict[str, dict[str, Any]] = {}
        for cfg in configs:
            runs = [r for r in stream if r["config"] == cfg and r["concurrency"] == c]
            if not runs:
                continue
            srows[cfg] = {
                "ttft_p50_ms": median([r["median_ttft_ms"] for r in runs]),
                "ttft_p99_ms": median([r["p99_ttft_ms"] for r in runs]),
                "itl_p50_ms": median([r["median_itl_ms"] for r in runs]),
                "itl_p99_ms": median([r["p99_itl_ms"] for r in runs]),
                "e2el_p50_ms": median([r["median_e2el_ms"] for r in runs]),
                "e2el_p99_ms": median([r["p99_e2el_ms"] for r in runs]),
                "rps": median([r["request_throughput"] for r in runs]),
                "failed": sum(r["failed"] or 0 for r in runs),
            }
        _ratios(srows, ("ttft_p50_ms", "itl_p50_ms", "e2el_p50_ms", "rps"))
        _paired_rps_ratios(srows, [r for r in stream if r["concurrency"] == c], "request_throughput")
        _paired_rps_ratios(srows, [r for r in stream if r["concurrency"] == c], "request_throughput", *BASE_PAIR)
        out["stream"][str(c)] = srows
    for cfg in configs:
        runs = [g for g in gaps if g["config"] == cfg]
        if runs:
            out["chunk_gaps"][cfg] = {
                "gap_p50_ms": median([g["gap_ms"]["p50"] for g in runs]),
                "gap_p99_ms": median([g["gap_ms"]["p99"] for g in runs]),
                "events_per_read": median([g["events_per_read"] for g in runs]),
                "events_per_response": median([g["events_per_response"]["p50"] for g in runs]),
                "ttft_p50_ms": median([g["ttft_ms"]["p50"] for g in runs]),
            }
    if "ours_http_base" in configs:
        out["ab"] = _ab(out)
    return out


# ours_http against ours_http_base (--baseline-tree): (reference config, which configs, name in the keys)
BASE_PAIR = ("ours_http_base", ("ours_http",), "base")


def _ab(out: dict[str, Any]) -> dict[str, Any]:
    """The A/B in one place, per concurrency: ours_http (this checkout) against ours_http_base (the baseline
    checkout); `rps_ratio_*` is ours / base, so above 1 means this checkout serves more requests per second."""
    ab: dict[str, Any] = {"nonstream": {}, "stream": {}}
    for c, rows in out["nonstream"].items():
        ours, base = rows.get("ours_http"), rows.get("ours_http_base")
        if not ours or not base:
            continue
        cpu_ours = ours["cpu_ms_per_request"].get("router", 0) + ours["cpu_ms_per_request"].get("worker", 0)
        cpu_base = base["cpu_ms_per_request"].get("router_base", 0) + base["cpu_ms_per_request"].get("worker_base", 0)
        ab["nonstream"][c] = {
            "ours_http_rps": ours["rps"],
            "ours_http_base_rps": base["rps"],
            "rps_ratio_by_round": ours.get("rps_vs_base_by_round"),
            "rps_ratio_paired_median": ours.get("rps_vs_base_paired_median"),
            "p50_ms": [ours["p50_ms"], base["p50_ms"]],
            "p50_ratio": ratio(ours["p50_ms"], base["p50_ms"]),
            "p99_ms": [ours["p99_ms"], base["p99_ms"]],
            "router_worker_cpu_ms_per_request": [round(cpu_ours, 3), round(cpu_base, 3)],
            "cpu_ratio": ratio(cpu_ours, cpu_base),
            "errors": [ours["errors"], base["errors"]],
        }
    for c, rows in out["stream"].items():
        ours, base = rows.get("ours_http"), rows.get("ours_http_base")
        if ours and base:
            ab["stream"][c] = {
                "ours_http_rps": ours["rps"],
                "ours_http_base_rps": base["rps"],
                "rps_ratio_by_round": ours.get("rps_vs_base_by_round"),
                "rps_ratio_paired_median": ours.get("rps_vs_base_paired_median"),
                "ttft_p50_ms": [ours["ttft_p50_ms"], base["ttft_p50_ms"]],
                "itl_p50_ms": [ours["itl_p50_ms"], base["itl_p50_ms"]],
            }
    gaps = out["chunk_gaps"]
    if "ours_http" in gaps and "ours_http_base" in gaps:
        ab["chunk_gap_p50_ms"] = [gaps["ours_http"]["gap_p50_ms"], gaps["ours_http_base"]["gap_p50_ms"]]
    return ab


def _paired_rps_ratios(
    rows: dict[str, dict[str, Any]],
    runs: list[dict[str, Any]],
    key: str,
    ref: str = "rust",
    only: tuple[str, ...] | None = None,
    label: str = "rust",
) -> None:
    """Requests per second against the reference's (the Rust router's; ours_http_base's for the A/B) within
    each round (runs minutes apart, not the whole run apart), and their median: the engine's speed drifts
    between rounds on a shared machine, and a ratio of two medians taken over different rounds carries that
    drift. Written as rps_vs_<label>_by_round and rps_vs_<label>_paired_median on the rows of `only` (all)."""
    by_round: dict[tuple[int, str], float] = {(r["round"], r["config"]): r[key] for r in runs}
    for cfg, row in rows.items():
        if cfg == ref or (only is not None and cfg not in only):
            continue
        paired = [
            ratio(by_round[(rnd, cfg)], by_round[(rnd, ref)])
            for rnd, c in sorted(by_round)
            if c == cfg and (rnd, ref) in by_round
        ]
        if paired:
            row[f"rps_vs_{label}_by_round"] = paired
            row[f"rps_vs_{label}_paired_median"] = median(paired)


def _ratios(rows: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> None:
    for cfg, row in rows.items():
        for ref in ("direct", "rust"):
            if ref in rows and ref != cfg:
                row[f"vs_{ref}"] = {k: ratio(row[k], rows[ref][k]) for k in keys}
                first = keys[0]
                row[f"added_{first}_vs_{ref}"] = (
                    round(row[first] - rows[ref][first], 3)
                    if row[first] is not None and rows[ref][first] is not None
                    else None
                )


if __name__ == "__main__":
    main()
