"""`svllm keys create|list|show|update|revoke|usage`: API keys of a running deployment, through the router's key API
(admin key)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from .cli_flags import add_flag, command_parser
from .cli_status import admin_call, router_url
from .config import CliSettings


def _call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
) -> Any:
    return admin_call(f"svllm keys {args.keys_command}", router_url(args), method, path, body, params)


def key_body(args: argparse.Namespace) -> dict[str, Any]:
    # A value given is sent as given (a 0 is the router's to refuse, not a limit to drop silently).
    given = (("rpm", args.rpm), ("tpm", args.tpm), ("max_concurrent", args.max_concurrent))
    limits = {k: v for k, v in given if v is not None}
    body: dict[str, Any] = {"name": args.name, "tenant": args.tenant, "limits": limits}
    if args.priority is not None:
        body["priority"] = args.priority  # else the API's default, normal
    if args.model:
        body["models"] = args.model
    if args.expires_in is not None:
        body["expires_at"] = time.time() + args.expires_in
    return body


def cmd_create(args: argparse.Namespace) -> None:
    created = _call(args, "POST", "/v1/keys", key_body(args))
    print(json.dumps(created, indent=2) if args.json else created["secret"])


def cmd_list(args: argparse.Namespace) -> None:
    keys = _call(args, "GET", "/v1/keys")["data"]
    if args.json:
        print(json.dumps(keys, indent=2))
        return
    print(f"{'ID':22} {'NAME':20} {'TENANT':16} {'PRIORITY':8} {'STATE':8} LIMITS")
    for k in keys:
        state = "revoked" if k["revoked_at"] else "expired" if (k["expires_at"] or 1e20) <= time.time() else "active"
        limits = " ".join(f"{n}={v}" for n, v in k["limits"].items() if v) or "-"
        print(f"{k['id']:22} {k['name']:20} {k['tenant']:16} {k['priority']:8} {state:8} {limits}")


def cmd_show(args: argparse.Namespace) -> None:
    print(json.dumps(_call(args, "GET", f"/v1/keys/{args.ref}"), indent=2))


def cmd_update(args: argparse.Namespace) -> None:
    patch: dict[str, Any] = {}
    given = {"rpm": args.rpm, "tpm": args.tpm, "max_concurrent": args.max_concurrent}
    if any(v is not None for v in given.values()):
        # The API replaces limits as a whole: the limits not given stay as they are.
        limits = _call(args, "GET", f"/v1/keys/{args.ref}")["limits"]
        patch["limits"] = {**limits, **{k: v for k, v in given.items() if v is not None}}
    for field in ("tenant", "priority"):
        if getattr(args, field) is not None:
            patch[field] = getattr(args, field)
    if args.model:
        patch["models"] = args.model
    if args.expires_in is not None:
        patch["expires_at"] = time.time() + args.expires_in
    if not patch:
        raise SystemExit("svllm keys update: nothing to change (give at least one flag)")
    info = _call(args, "PATCH", f"/v1/keys/{args.ref}", patch)
    print(json.dumps(info, indent=2) if args.json else f"updated {info['name']} ({info['id']})")


def cmd_revoke(args: argparse.Namespace) -> None:
    info = _call(args, "DELETE", f"/v1/keys/{args.ref}")
    print(f"revoked {info['name']} ({info['id']})")


def cmd_usage(args: argparse.Namespace) -> None:
    asked = {"tenant": args.tenant, "key": args.key}
    rows = _call(args, "GET", "/v1/usage", params={k: v for k, v in asked.items() if v} or None)["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    columns = ("REQUESTS", "PROMPT", "COMPLETION", "ERRORS", "THROTTLED")
    print(f"{'TENANT':16} {'KEY':20} {'MODEL':24} " + " ".join(f"{c:>10}" for c in columns))
    for r in rows:
        print(
            f"{r['tenant']:16} {r['key_name']:20} {r['model']:24} {r['requests']:>10} {r['prompt_tokens']:>10} "
            f"{r['completion_tokens']:>10} {r['errors']:>10} {r['throttled']:>10}"
        )


def _key_flags(p: argparse.ArgumentParser, models: str, limits: str) -> None:
    """What create and update both set (update: only what is given, so no default)."""
    p.add_argument("--model", action="append", help=f"an alias or glob pattern it may use {models}")
    p.add_argument("--rpm", type=int, help="requests per minute" + limits)
    p.add_argument("--tpm", type=int, help="prompt + completion tokens per minute" + limits)
    p.add_argument("--max-concurrent", type=int, help="requests in flight at once" + limits)
    p.add_argument("--priority", choices=["high", "normal", "low"])
    p.add_argument("--expires-in", type=float, help="seconds from now until the key expires")


def add_parser(sub: Any) -> None:
    keys = command_parser(sub, "keys", "API keys of a running deployment (admin key: SVLLM_ADMIN_KEY)", CliSettings)
    actions = keys.add_subparsers(dest="keys_command", required=True)

    def command(name: str, text: str, func: Callable[[argparse.Namespace], None], ref: bool = False) -> Any:
        """A subcommand (with --url); `ref`: it names a key by id or name."""
        p = actions.add_parser(name, help=text)
        if ref:
            p.add_argument("ref", help="the key's id or name")
        add_flag(p, CliSettings, "router_url", "--url")
        p.set_defaults(func=func)
        return p

    p = command("create", "make a key; prints its secret (shown this once)", cmd_create)
    p.add_argument("--name", required=True, help="unique name of the key")
    p.add_argument("--tenant", required=True, help="the team or customer it belongs to")
    _key_flags(p, "(repeatable; default '*')", "")
    p.add_argument("--json", action="store_true", help="print the whole key, not just its secret")

    command("list", "every key (never their secrets)", cmd_list).add_argument("--json", action="store_true")
    command("show", "one key by id or name (never its secret)", cmd_show, ref=True)

    p = command("update", "change a key (the flags given; every router has it within 2 s)", cmd_update, ref=True)
    p.add_argument("--tenant", help="move it to this tenant")
    _key_flags(p, "(repeatable; replaces them)", " (the other limits stay)")
    p.add_argument("--json", action="store_true", help="print the whole key")

    command("revoke", "revoke a key by id or name (every router refuses it within 2 s)", cmd_revoke, ref=True)

    p = command("usage", "requests and tokens per key and model, summed over every router", cmd_usage)
    p.add_argument("--tenant", help="only this tenant's keys")
    p.add_argument("--key", help="only this key (its id or name)")
    p.add_argument("--json", action="store_true")
