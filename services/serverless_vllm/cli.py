"""`svllm`: run the manager, the router, a worker, or everything at once (`svllm up`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr

from .config import AuthSettings, ManagerSettings, RouterSettings, WorkerSettings
from .dataplane.server_protocol import CoalescingHttpToolsProtocol

log = logging.getLogger("svllm")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _server(app: object, host: str, port: int, level: str) -> uvicorn.Server:
    # The servers log their own access lines only at debug level: the hot path should not pay for logging.
    # One socket write per response instead of two (server_protocol.py).
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=level.lower(),  # type: ignore[arg-type]
            http=CoalescingHttpToolsProtocol,
            access_log=level.lower() == "debug",
            timeout_graceful_shutdown=5,
        )
    )


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's event loop: uvloop when installed (it comes with vLLM and with Ray), whose socket I/O costs
    less per request on the relay than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def manager_app(settings: ManagerSettings, auth: AuthSettings | None = None) -> object:
    from .manager.http_app import create_app

    return create_app(settings, auth=auth)


def router_app(settings: RouterSettings, auth: AuthSettings | None = None) -> object:
    from .manager.http_client import HTTPManagerClient
    from .router.app import create_router_app

    auth = auth or AuthSettings.from_env()
    # The router's service credential to the manager is the admin key (it checks that key itself anyway).
    return create_router_app(
        settings, lambda: HTTPManagerClient(settings.manager_url, headers=auth.admin_headers()), auth=auth
    )


def worker_app(settings: WorkerSettings, auth: AuthSettings | None = None) -> object:
    from .worker.app import create_app

    return create_app(settings, auth=auth)


def cmd_manager(args: argparse.Namespace) -> None:
    settings = ManagerSettings.from_env(
        host=args.host, port=args.port, db_path=args.db, heartbeat_timeout_s=args.heartbeat_timeout_s
    )
    _run(_server(manager_app(settings), settings.host, settings.port, args.log_level).serve())


def cmd_router(args: argparse.Namespace) -> None:
    settings = RouterSettings.from_env(
        host=args.host, port=args.port, manager_url=args.manager_url, processes=args.workers
    )
    if settings.processes > 1:
        # Stateless apart from its table, so N processes each keep their own and share the port.
        os.environ.update(ROUTER_HOST=settings.host, ROUTER_PORT=str(settings.port), MANAGER_URL=settings.manager_url)
        os.execvp(
            sys.executable,
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(settings.processes),
                "--worker-class",
                "serverless_vllm.dataplane.gunicorn_worker.CoalescingUvicornWorker",
                "--bind",
                f"{settings.host}:{settings.port}",
                "--graceful-timeout",
                "10",
                "serverless_vllm.router.app:app_from_env()",
            ],
        )
    _run(_server(router_app(settings), settings.host, settings.port, args.log_level).serve())


def cmd_worker(args: argparse.Namespace) -> None:
    settings = WorkerSettings.from_env(
        worker_id=args.worker_id,
        host=args.host,
        port=args.port,
        manager_url=args.manager_url,
        public_url=args.public_url,
        heartbeat_interval_s=args.heartbeat_interval,
    )
    _run(_server(worker_app(settings), settings.host, settings.port, args.log_level).serve())


async def register_model(url: str, body: dict[str, object], auth: AuthSettings | None = None) -> dict[str, object]:
    headers = (auth or AuthSettings.from_env()).admin_headers()  # SVLLM_ADMIN_KEY
    async with httpx.AsyncClient(timeout=60.0) as client:
        resp = await client.post(f"{url.rstrip('/')}/v1/models/register", json=body, headers=headers)
        if resp.status_code >= 400:
            raise SystemExit(f"registration failed ({resp.status_code}): {resp.text}")
        return resp.json()


def _registration_body(args: argparse.Namespace) -> dict[str, object]:
    body: dict[str, object] = {
        "alias": args.alias or os.path.basename(args.model.rstrip("/")),
        "model_name": args.model,
    }
    if args.max_model_len:
        body["max_model_len"] = args.max_model_len
    if args.engine_arg:
        body["extra_args"] = args.engine_arg
    return body


def cmd_register(args: argparse.Namespace) -> None:
    info = asyncio.run(register_model(args.url, _registration_body(args)))
    print(f"registered {info['alias']} -> {info['model_name']} (state: {info['state']})")


def cmd_up(args: argparse.Namespace) -> None:
    """Manager, router and one local worker in one process: the quick start without Docker."""
    state_dir = os.path.abspath(args.state_dir)
    auth = _local_auth()
    # Local mode: any absolute model path, unless SVLLM_MODEL_DIRS narrows it.
    manager = ManagerSettings.from_env(
        host="127.0.0.1",
        port=args.manager_port,
        db_path=os.path.join(state_dir, "manager.db"),
        model_dirs=None if os.environ.get("SVLLM_MODEL_DIRS") else ["/"],
    )
    router = RouterSettings.from_env(host=args.host, port=args.port, manager_url=f"http://127.0.0.1:{manager.port}")
    worker = WorkerSettings.from_env(
        host="127.0.0.1",
        port=args.worker_port,
        manager_url=router.manager_url,
        public_url=f"http://127.0.0.1:{args.worker_port}",
        heartbeat_interval_s=2.0,
        log_dir=os.path.join(state_dir, "engines"),
    )

    async def run() -> None:
        servers = [
            _server(manager_app(manager, auth), manager.host, manager.port, args.log_level),
            _server(router_app(router, auth), router.host, router.port, args.log_level),
            _server(worker_app(worker, auth), worker.host, worker.port, args.log_level),
        ]
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        url = f"http://127.0.0.1:{router.port}"
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.1)
        if args.model and all(s.started for s in servers):
            info = await register_model(url, _registration_body(args), auth)
            log.info("registered %s -> %s", info["alias"], info["model_name"])
        log.info("serving the OpenAI API at http://%s:%d/v1 (Ctrl-C to stop)", router.host, router.port)
        await asyncio.gather(*tasks)

    _run(run())


def _local_auth() -> AuthSettings:
    """`svllm up`: authentication off unless credentials are set (said in the log); with client keys set, the
    internal credentials it lacks are made up for this run (all three services live in this process)."""
    auth = AuthSettings.from_env()
    if not auth.configured and not os.environ.get("SVLLM_AUTH"):
        log.warning(
            "authentication is OFF (local mode: no SVLLM_API_KEYS, SVLLM_ADMIN_KEY or SVLLM_WORKER_TOKEN "
            "set); set them before exposing this beyond loopback"
        )
        return auth.model_copy(update={"mode": "off"})
    if not auth.enabled:
        return auth
    generated = {
        k: SecretStr(secrets.token_urlsafe(32)) for k in ("admin_key", "worker_token") if getattr(auth, k) is None
    }
    if "admin_key" in generated:
        log.warning("no SVLLM_ADMIN_KEY: a random one is used for this run (register models with --model)")
    return auth.model_copy(update=generated)


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .testing.tiny_model import make_tiny_model

    print(make_tiny_model(args.path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svllm", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("manager", help="the manager (registry, placement, routing table)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--db", help="SQLite path of the registry (env MANAGER_DB)")
    p.add_argument(
        "--heartbeat-timeout", dest="heartbeat_timeout_s", type=float, help="seconds without heartbeat before unhealthy"
    )
    p.set_defaults(func=cmd_manager)

    p = sub.add_parser("router", help="the OpenAI-compatible router")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--manager-url")
    p.add_argument("--workers", type=int, help="router processes (gunicorn with uvicorn workers)")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("worker", help="a worker: runs vLLM engines on this machine")
    p.add_argument("--worker-id")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--manager-url", help="the manager, or a router (it passes worker calls on)")
    p.add_argument("--public-url", help="the address others use to reach this worker")
    p.add_argument("--heartbeat-interval", type=float)
    p.set_defaults(func=cmd_worker)

    def model_flags(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--model", required=required, help="HF id or local path of the model")
        p.add_argument("--alias", help="name clients use (default: the model's folder name)")
        p.add_argument("--max-model-len", type=int)
        p.add_argument("--engine-arg", action="append", default=[], help="extra vLLM argument (repeatable)")

    p = sub.add_parser("up", help="manager + router + one local worker in one process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18000)
    p.add_argument("--manager-port", type=int, default=9000)
    p.add_argument("--worker-port", type=int, default=7000)
    p.add_argument("--state-dir", default=os.environ.get("SVLLM_STATE_DIR", ".svllm"))
    model_flags(p, required=False)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("register", help="register a model with a running router")
    p.add_argument("--url", default=os.environ.get("ROUTER_URL", "http://127.0.0.1:18000"))
    model_flags(p, required=True)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("tiny-model", help="write a tiny random Llama model (for trying the system without a hub)")
    p.add_argument("path")
    p.set_defaults(func=cmd_tiny_model)

    from .ray_mode.cli import add_parser as add_ray_services_parser  # no Ray import until the command runs

    add_ray_services_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from .security.auth import AuthConfigError

    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        args.func(args)
    except AuthConfigError as exc:
        raise SystemExit(f"svllm {args.command}: {exc}") from None


if __name__ == "__main__":
    main()
