"""`svllm patch` and `svllm delete`: a registered model's policy changed, or the model deleted, through the router's
model API (admin key); `svllm register` registers (cli.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .cli_flags import add_flag, command_parser
from .cli_policy import add_policy_flags, policy_given
from .cli_status import admin_call, router_url
from .config import CliSettings


def cmd_patch(args: argparse.Namespace) -> None:
    patch = policy_given(args)
    if not patch:
        raise SystemExit("svllm patch: nothing to change (give at least one of the policy's flags)")
    info = admin_call("svllm patch", router_url(args), "PATCH", f"/v1/models/{args.alias}", patch)
    print(f"{info['alias']}: {json.dumps(info['policy'])}")


def cmd_delete(args: argparse.Namespace) -> None:
    params = {"cascade": "true"} if args.cascade else None
    admin_call("svllm delete", router_url(args), "DELETE", f"/v1/models/{args.alias}", params=params)
    print(f"deleted {args.alias}" + (" and its adapters" if args.cascade else ""))


def add_parsers(sub: Any) -> None:
    patch_help = "change a registered model's policy (replicas, idle timeout, routing)"
    p = command_parser(sub, "patch", patch_help, CliSettings)
    p.add_argument("alias", help="the model's alias")
    add_policy_flags(p, scheduling=False)
    add_flag(p, CliSettings, "router_url", "--url")
    p.set_defaults(func=cmd_patch)

    p = command_parser(sub, "delete", "unregister a model (its replicas drain, then stop)", CliSettings)
    p.add_argument("alias", help="the model's alias")
    p.add_argument("--cascade", action="store_true", help="a base with LoRA adapters: delete its adapters too")
    add_flag(p, CliSettings, "router_url", "--url")
    p.set_defaults(func=cmd_delete)
