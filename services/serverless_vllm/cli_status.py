"""`svllm status`: a running deployment at a glance, as `serve status` and `kubectl get` show theirs.

One call to the router's `GET /status` (admin key, as `svllm register` sends it), then two aligned tables: the
models (task, state, replicas ready of the target, where they run) and the workers (health, last heartbeat, GPUs,
engines). `--json` prints the same rows as one JSON document. A router that cannot be reached or refuses the key
is one clear sentence on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import ValidationError

from .cli_flags import flag_values
from .config import AuthSettings, CliSettings
from .errors import APIError
from .schemas import FleetStatus, ModelInfo, ModelState, ReplicaState, WorkerInfo, failure_reason

MODEL_COLUMNS = ("MODEL", "TASK", "STATE", "READY", "WHERE")
WORKER_COLUMNS = ("WORKER", "HEALTH", "HEARTBEAT", "GPUS", "ENGINES")


class StatusError(Exception):
    """Why there is no status to show, in one sentence for the operator."""


def unreachable(exc: httpx.HTTPError, url: str = "") -> str:
    if not url:
        with contextlib.suppress(RuntimeError):  # httpx raises it for an error that has no request
            url = f"{exc.request.url.scheme}://{exc.request.url.netloc.decode()}"
    return (
        f"cannot reach the router at {url or 'its address'} ({type(exc).__name__}: {str(exc) or 'no answer'}); is it "
        "running? (--url or ROUTER_URL names it)"
    )


def refused(what: str, resp: httpx.Response) -> SystemExit:
    """The exit of a command the router refused: its status, code and message (not the JSON they came in)."""
    error = APIError.from_response(resp.status_code, resp.content)
    return SystemExit(f"{what} failed ({resp.status_code}{f' {error.code}' if error.code else ''}): {error.message}")


def router_url(args: argparse.Namespace) -> str:
    """The router a command talks to: --url, else ROUTER_URL."""
    return CliSettings.from_env(**flag_values(args, CliSettings)).router_url


def admin_call(
    what: str,
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
) -> Any:
    """A command's call of the router's admin API with SVLLM_ADMIN_KEY: its JSON answer, or the command's exit."""
    headers = AuthSettings.from_env().admin_headers()
    resp = httpx.request(method, f"{url.rstrip('/')}{path}", json=body, params=params, headers=headers, timeout=30.0)
    if resp.status_code >= 400:
        raise refused(what, resp)
    return resp.json()


def fetch_status(url: str, auth: AuthSettings | None = None, timeout: float = 10.0) -> FleetStatus:
    """GET /status from the router at `url` with the admin key (SVLLM_ADMIN_KEY); StatusError when it fails."""
    auth = auth or AuthSettings.from_env()
    base = url.rstrip("/")
    try:
        resp = httpx.get(f"{base}/status", headers=auth.admin_headers(), timeout=timeout)
    except httpx.HTTPError as exc:
        raise StatusError(unreachable(exc, base)) from None
    if resp.status_code in (401, 403):
        hint = "set SVLLM_ADMIN_KEY to the router's admin key" if not auth.admin_headers() else "check SVLLM_ADMIN_KEY"
        raise StatusError(f"the router at {base} refused the credentials ({resp.status_code}): {hint}")
    if resp.status_code == 404:
        raise StatusError(f"{base} has no GET /status: is it a serverless-vllm router (of this version)?")
    if resp.status_code >= 400:
        said = APIError.from_response(resp.status_code, resp.content).message
        raise StatusError(f"the router at {base} answered {resp.status_code}: {said}")
    try:
        return FleetStatus.model_validate_json(resp.content)
    except ValidationError:
        raise StatusError(
            f"{base}/status did not answer with a fleet status: is it a serverless-vllm router?"
        ) from None


# --------------------------------------------------------------------------- rows (the JSON document)


def model_row(info: ModelInfo) -> dict[str, Any]:
    return {
        "alias": info.alias,
        "model_name": info.model_name,
        "task": info.engine.task.value,
        "state": info.state.value,
        "ready": sum(1 for r in info.replicas if r.state is ReplicaState.READY),
        # An adapter has no replicas of its own: its targets are its base's replicas that hold it or are asked to.
        "target": len(info.replicas) if info.base is not None else info.desired_replicas,
        "replicas": [
            {"replica_id": r.replica_id, "worker_id": r.worker_id, "gpus": r.gpus, "state": r.state.value}
            for r in info.replicas
        ],
        "error": info.last_error if info.state is ModelState.FAILED else None,
    }


def worker_row(info: WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": info.worker_id,
        "url": info.url,
        "state": info.state.value,
        "heartbeat_age_s": round(info.heartbeat_age_s, 1),
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "memory_total_mb": g.memory_total_mb,
                "memory_foreign_mb": info.foreign_memory_mb.get(g.index, 0),
            }
            for g in info.gpus
        ],
        "cpu_slots": info.cpu_slots,
        "engines": [{"replica_id": e.replica_id, "alias": e.alias, "state": e.state.value} for e in info.engines],
    }


def status_document(status: FleetStatus) -> dict[str, Any]:
    """What `--json` prints: the rows of both tables, unformatted."""
    return {
        "models": [model_row(m) for m in sorted(status.models, key=lambda m: m.alias)],
        "workers": [worker_row(w) for w in sorted(status.workers, key=lambda w: w.worker_id)],
    }


# --------------------------------------------------------------------------- tables


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned by their widest cell, two spaces apart; the last one not padded."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in (columns, *rows)
    ]
    return "\n".join(lines)


def _where(row: dict[str, Any]) -> str:
    cells = []
    for r in row["replicas"]:
        device = "gpu " + ",".join(map(str, r["gpus"])) if r["gpus"] else "cpu"
        cells.append(f"{r['worker_id']} ({device}) {r['state']}")
    return ", ".join(cells) or "-"


def _gpus(row: dict[str, Any]) -> str:
    if not row["gpus"]:
        return f"cpu, {row['cpu_slots']} slot{'s' if row['cpu_slots'] != 1 else ''}"
    names = Counter(g["name"] for g in row["gpus"])
    # Memory others hold (placement leaves it out), from 1 GiB: an idle GPU's driver reserves a few hundred MiB.
    others = [
        f"gpu{g['index']} {g['memory_foreign_mb'] / 1024:.1f}" for g in row["gpus"] if g["memory_foreign_mb"] >= 1024
    ]
    used = f" (GiB used by others: {', '.join(others)})" if others else ""
    return ", ".join(f"{n} x {name}" for name, n in names.items()) + used


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def render(document: dict[str, Any]) -> str:
    """The two tables (and the reason of each failed model), as `svllm status` prints them."""
    models, workers = document["models"], document["workers"]
    out = []
    if models:
        out.append(
            table(
                MODEL_COLUMNS,
                [(m["alias"], m["task"], m["state"], f"{m['ready']}/{m['target']}", _where(m)) for m in models],
            )
        )
        for m in models:
            if m["error"]:
                out.append(f"{m['alias']} failed: {failure_reason(m['error'])}")
    else:
        out.append("no models registered (svllm register)")
    out.append("")
    if workers:
        rows = [
            (
                w["worker_id"],
                w["state"],
                _age(w["heartbeat_age_s"]),
                _gpus(w),
                ", ".join(f"{e['alias']} {e['state']}" for e in w["engines"]) or "-",
            )
            for w in workers
        ]
        out.append(table(WORKER_COLUMNS, rows))
    else:
        out.append("no workers registered (svllm worker --manager-url ...)")
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> None:
    url = router_url(args)
    try:
        document = status_document(fetch_status(url))
    except StatusError as exc:
        raise SystemExit(f"svllm status: {exc}") from None
    print(json.dumps(document, indent=2) if args.json else render(document))
