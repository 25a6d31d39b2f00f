"""`svllm`: run the manager, the router, a worker, or everything at once (`svllm up`); see it (`svllm status`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from argparse import RawDescriptionHelpFormatter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import httpx
import uvicorn
from pydantic import ValidationError

from .cli_flags import add_flag, command_parser, env_help, flag_values
from .cli_keys import add_parser as add_keys_parser
from .cli_lora import add_lora_flags, registration
from .cli_models import add_parsers as add_model_parsers
from .cli_policy import add_policy, add_policy_flags
from .cli_status import cmd_status, refused, router_url, unreachable
from .config import AuthSettings, CliSettings, ManagerSettings, RouterSettings, WorkerSettings
from .dataplane.server_protocol import CoalescingHttpToolsProtocol
from .schemas import LoadFormat, ModelTask

log = logging.getLogger("svllm")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: the control plane's own calls (heartbeats, long-polls, health polls) would
    # bury what happens. A line per request at debug only; httpcore's trace never, its warnings always.
    debug = level.lower() == "debug"
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.INFO if debug else logging.WARNING)


def _server(
    app: Any, host: str, port: int, level: str, leave: Callable[[], Awaitable[None]] | None = None, drain_s: float = 5.0
) -> uvicorn.Server:
    """`leave`: a worker's drain, run at the first SIGTERM or Ctrl-C before the server stops (worker/shutdown.py).
    `drain_s`: how long the server, stopping, waits for the requests in flight (ROUTER_DRAIN_TIMEOUT for a router)."""
    # Access lines at debug only (the hot path should not pay for logging); one socket write per response, and a
    # timeout for clients that stall (server_protocol.py).
    cli = CliSettings.from_env()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=level.lower(),
        http=CoalescingHttpToolsProtocol.with_client_timeout(cli.client_timeout_s),
        timeout_keep_alive=cli.keep_alive_s,
        access_log=level.lower() == "debug",
        timeout_graceful_shutdown=math.ceil(drain_s),  # whole seconds (uvicorn's type)
    )
    if leave is None:
        return uvicorn.Server(config)
    from .worker.shutdown import DrainingServer

    return DrainingServer(config, leave)


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's event loop: uvloop when installed (with vLLM and Ray): less socket I/O cost per request."""
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
    settings = ManagerSettings.from_env(**flag_values(args, ManagerSettings))
    _run(_server(manager_app(settings), settings.host, settings.port, args.log_level).serve())


def cmd_router(args: argparse.Namespace) -> None:
    settings = RouterSettings.from_env(**flag_values(args, RouterSettings))
    if settings.processes > 1:
        if "router_id" in settings.model_fields_set:  # load reports are per router_id: one name per process
            raise SystemExit("svllm router: ROUTER_ID names one process; leave it unset with --workers")
        # Stateless apart from its table, so N processes each keep their own and share the port. Each reads its
        # settings with from_env: the flags reach it as their environment variables.
        os.environ.update(settings.to_env("host", "port", "manager_url"))
        from .dataplane.gunicorn_worker import gunicorn_argv

        os.execvp(sys.executable, gunicorn_argv(settings, CliSettings.from_env().keep_alive_s))
    app = router_app(settings)
    _run(_server(app, settings.host, settings.port, args.log_level, drain_s=settings.drain_timeout_s).serve())


def cmd_worker(args: argparse.Namespace) -> None:
    settings = WorkerSettings.from_env(**flag_values(args, WorkerSettings))
    app: Any = worker_app(settings)
    # SIGTERM drains first: the requests in flight finish (DRAIN_TIMEOUT), then the engines stop and the worker exits.
    _run(_server(app, settings.host, settings.port, args.log_level, app.state.leave).serve())


async def register_model(url: str, body: dict[str, object], auth: AuthSettings | None = None) -> dict[str, object]:
    headers = (auth or AuthSettings.from_env()).admin_headers()  # SVLLM_ADMIN_KEY
    async with httpx.AsyncClient(timeout=60.0) as client:
        resp = await client.post(f"{url.rstrip('/')}/v1/models/register", json=body, headers=headers)
        if resp.status_code >= 400:
            raise refused("registration", resp)
        info: dict[str, object] = resp.json()
        return info


TINY = "tiny"  # `svllm up --embed-model tiny`: the tiny random model made locally (`svllm tiny-model`)


def registration_body(
    model: str,
    alias: str | None = None,
    task: str = "generate",
    max_model_len: int | None = None,
    extra_args: Sequence[str] = (),
    load_format: str = LoadFormat.AUTO.value,
    revision: str | None = None,
) -> dict[str, object]:
    """Body of POST /v1/models/register (schemas.ModelSpec); the alias defaults to the model's folder name."""
    body: dict[str, object] = {"alias": alias or os.path.basename(model.rstrip("/")), "model_name": model}
    if task != "generate":
        body["task"] = task
    if max_model_len:
        body["max_model_len"] = max_model_len
    if load_format != LoadFormat.AUTO.value:
        body["load_format"] = load_format
    if revision:
        body["revision"] = revision
    if extra_args:
        body["extra_args"] = list(extra_args)
    return body


def tiny_model_dir(state_dir: str) -> str:
    return os.path.join(os.path.realpath(state_dir), "models", TINY)  # where scripts/up.sh makes it by default


def up_registrations(args: argparse.Namespace) -> list[dict[str, object]]:
    """What `svllm up` registers once its services run: --model (a chat model), --embed-model (task embed)."""
    bodies = []
    if args.model:
        bodies.append(
            registration_body(args.model, args.alias, "generate", args.max_model_len, args.engine_arg, args.load_format)
        )
    if args.embed_model == TINY:
        # 512 tokens, as scripts/up.sh gives the chat model: the tiny model's context is only for trying things out
        bodies.append(registration_body(tiny_model_dir(args.state_dir), args.embed_alias, "embed", 512))
    elif args.embed_model:
        bodies.append(registration_body(args.embed_model, args.embed_alias, "embed"))
    if len({b["alias"] for b in bodies}) < len(bodies):
        raise SystemExit(f"svllm up: --alias and --embed-alias must differ (both {bodies[0]['alias']!r})")
    return bodies


def _registered(info: dict[str, object]) -> str:
    engine = info.get("engine")
    task = engine.get("task", "generate") if isinstance(engine, dict) else "generate"
    return f"{info['alias']} -> {info['model_name']}" + (f" (task {task})" if task != "generate" else "")


def cmd_register(args: argparse.Namespace) -> None:
    url = router_url(args)
    body = registration(args, lambda: registration_body(
        args.model, args.alias, args.task, args.max_model_len, args.engine_arg, args.load_format, args.revision
    ))  # fmt: skip
    add_policy(body, args)
    info = asyncio.run(register_model(url, body))
    print(f"registered {_registered(info)} (state: {info['state']})")


def up_settings(args: argparse.Namespace) -> tuple[ManagerSettings, RouterSettings, WorkerSettings]:
    """`svllm up`: the three services on loopback (the router on --host), their files under --state-dir."""
    state_dir = os.path.abspath(args.state_dir)
    manager = ManagerSettings.from_env(
        **flag_values(args, ManagerSettings), host="127.0.0.1", db_path=os.path.join(state_dir, "manager.db")
    )
    if "model_dirs" not in manager.model_fields_set:  # local mode: any absolute model path, unless narrowed
        manager = manager.model_copy(update={"model_dirs": ["/"]})
    router = RouterSettings.from_env(
        **flag_values(args, RouterSettings), host=args.host, manager_url=f"http://127.0.0.1:{manager.port}"
    )
    worker = WorkerSettings.from_env(
        **flag_values(args, WorkerSettings),
        host="127.0.0.1",
        manager_url=router.manager_url,
        heartbeat_interval_s=2.0,
        log_dir=os.path.join(state_dir, "engines"),
    )
    return manager, router, worker.model_copy(update={"public_url": f"http://127.0.0.1:{worker.port}"})


def cmd_up(args: argparse.Namespace) -> None:
    """Manager, router and one local worker in one process: the quick start without Docker."""
    auth, warnings = AuthSettings.from_env().for_local_run()
    for warning in warnings:
        log.warning("%s", warning)
    manager, router, worker = up_settings(args)
    registrations = up_registrations(args)
    if args.embed_model == TINY:
        from .testing.tiny_model import make_tiny_model

        make_tiny_model(tiny_model_dir(args.state_dir))  # at once when it is there already

    async def run() -> None:
        # The manager first: the router's long-poll and the worker's registration then find it listening (no
        # "manager unreachable" warning at every start). The worker's server is served last, so it is the one
        # uvicorn hands SIGTERM and Ctrl-C to: it drains (the requests in flight finish, at most DRAIN_TIMEOUT),
        # then each server stopping passes the signal on to the one served before it (router, then manager).
        local_worker: Any = worker_app(worker, auth)
        groups = [
            [_server(manager_app(manager, auth), manager.host, manager.port, args.log_level)],
            [
                _server(
                    router_app(router, auth), router.host, router.port, args.log_level, drain_s=router.drain_timeout_s
                ),
                _server(local_worker, worker.host, worker.port, args.log_level, local_worker.state.leave),
            ],
        ]
        tasks: list[asyncio.Task[None]] = []
        for group in groups:
            tasks += [asyncio.create_task(s.serve()) for s in group]
            while not all(s.started for s in group):
                if any(t.done() for t in tasks):
                    break  # it could not start (its error is in the log)
                await asyncio.sleep(0.1)
            if not all(s.started for s in group):
                break
        if all(s.started for group in groups for s in group):
            url = f"http://127.0.0.1:{router.port}"
            for body in registrations:
                log.info("registered %s", _registered(await register_model(url, body, auth)))
            log.info("serving the OpenAI API at http://%s:%d/v1 (Ctrl-C to stop)", router.host, router.port)
        await asyncio.gather(*tasks)
        signals.extend(sig for group in groups for s in group for sig in getattr(s, "_captured_signals", ()))

    signals: list[int] = []
    _run(run())
    if signals:  # stopped by a signal: exit as it says, whether or not its re-raise by uvicorn won a race with the end
        raise KeyboardInterrupt if signals[0] == signal.SIGINT else SystemExit(128 + signals[0])


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .testing.tiny_model import make_tiny_model

    print(make_tiny_model(args.path))


def build_parser() -> argparse.ArgumentParser:
    # Settings flags come from config/ (add_flag): default None, so the environment, then the default, applies;
    # their help is the setting's description with its variable and default. `svllm COMMAND --help` lists every
    # environment variable of the command's settings.
    parser = argparse.ArgumentParser(
        prog="svllm", description=__doc__, epilog=env_help(CliSettings), formatter_class=RawDescriptionHelpFormatter
    )
    add_flag(parser, CliSettings, "log_level", "--log-level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = command_parser(sub, "manager", "the manager (registry, placement, routing table)", ManagerSettings)
    add_flag(p, ManagerSettings, "host", "--host")
    add_flag(p, ManagerSettings, "port", "--port")
    add_flag(p, ManagerSettings, "db_path", "--db")
    add_flag(p, ManagerSettings, "heartbeat_timeout_s", "--heartbeat-timeout")
    p.set_defaults(func=cmd_manager)

    p = command_parser(sub, "router", "the OpenAI-compatible router", RouterSettings)
    add_flag(p, RouterSettings, "host", "--host")
    add_flag(p, RouterSettings, "port", "--port")
    add_flag(p, RouterSettings, "manager_url", "--manager-url")
    add_flag(p, RouterSettings, "processes", "--workers")
    p.set_defaults(func=cmd_router)

    p = command_parser(sub, "worker", "a worker: runs vLLM engines on this machine", WorkerSettings)
    add_flag(p, WorkerSettings, "worker_id", "--worker-id")
    add_flag(p, WorkerSettings, "host", "--host")
    add_flag(p, WorkerSettings, "port", "--port")
    add_flag(p, WorkerSettings, "manager_url", "--manager-url")
    add_flag(p, WorkerSettings, "public_url", "--public-url")
    add_flag(p, WorkerSettings, "heartbeat_interval_s", "--heartbeat-interval")
    p.set_defaults(func=cmd_worker)

    def model_flags(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--model", required=required, help="HF id or local path of the model")
        p.add_argument("--alias", help="name clients use (default: the model's folder name)")
        p.add_argument("--max-model-len", type=int)
        formats = [f.value for f in LoadFormat]
        p.add_argument("--load-format", choices=formats, default="auto", help="vLLM's weight loader (default: auto)")
        p.add_argument("--engine-arg", action="append", default=[], help="extra vLLM argument (repeatable)")

    up_help = "manager + router + one local worker in one process"
    up_own = "; it sets their hosts, MANAGER_URL, PUBLIC_URL, HEARTBEAT_INTERVAL and the paths under --state-dir"
    p = command_parser(
        sub, "up", up_help, ManagerSettings, RouterSettings, WorkerSettings, description=up_help + up_own
    )
    p.add_argument("--host", default="127.0.0.1", help="address of the router (default 127.0.0.1; the rest: loopback)")
    add_flag(p, RouterSettings, "port", "--port")
    add_flag(p, ManagerSettings, "port", "--manager-port", dest="manager_port")
    add_flag(p, WorkerSettings, "port", "--worker-port", dest="worker_port")
    p.add_argument(
        "--state-dir",
        default=os.environ.get("SVLLM_STATE_DIR", ".svllm"),
        help="registry and engine logs of this run (env SVLLM_STATE_DIR, default .svllm)",
    )
    model_flags(p, required=False)
    p.add_argument(
        "--embed-model",
        help=f"also register this model as an embedding model (task embed); {TINY!r}: the tiny local model",
    )
    p.add_argument("--embed-alias", default="embed", help="name clients use for it (default: embed)")
    p.set_defaults(func=cmd_up)

    p = command_parser(sub, "register", "register a model with a running router", CliSettings)
    add_flag(p, CliSettings, "router_url", "--url")
    model_flags(p, required=False)  # required unless an adapter is registered (cli_lora.py)
    add_lora_flags(p)
    tasks = [t.value for t in ModelTask]
    p.add_argument("--task", choices=tasks, default="generate", help="what the engine serves (default: generate)")
    p.add_argument("--revision", help="a hub model's branch, tag or commit (default: its default branch)")
    add_policy_flags(p)
    p.set_defaults(func=cmd_register)

    p = command_parser(sub, "status", "models and workers of a running deployment, as tables", CliSettings)
    add_flag(p, CliSettings, "router_url", "--url")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("tiny-model", help="write a tiny random Llama model (for trying the system without a hub)")
    p.add_argument("path")
    p.set_defaults(func=cmd_tiny_model)

    add_model_parsers(sub)  # svllm patch|delete
    add_keys_parser(sub)  # svllm keys create|list|revoke
    from .ray_mode.cli import add_parser as add_ray_services_parser  # no Ray import until the command runs

    add_ray_services_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from .security.auth import AuthConfigError

    args = build_parser().parse_args(argv)
    try:
        args.log_level = CliSettings.from_env(log_level=args.log_level).log_level
        _setup_logging(args.log_level)
        args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the services have shut down already; no traceback to show for it
        raise SystemExit(130) from None
    except AuthConfigError as exc:
        raise SystemExit(f"svllm {args.command}: {exc}") from None
    except ValidationError as exc:  # a setting's value (flag or environment variable) that does not parse
        raise SystemExit(f"svllm {args.command}: invalid settings: {exc}") from None
    except httpx.HTTPError as exc:  # the router a command talks to (keys, register) is not there, or mute
        raise SystemExit(f"svllm {args.command}: {unreachable(exc)}") from None


if __name__ == "__main__":
    main()
