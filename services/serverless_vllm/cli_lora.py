"""`svllm register`'s LoRA flags: a base's LoRA engine arguments, and an adapter registered on a base."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import get_args

from .schemas.models import LoraRank


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="register a LoRA adapter: the alias of its registered base model")
    p.add_argument("--adapter", help="register a LoRA adapter: its HF id or local path (with --base and --alias)")
    p.add_argument("--enable-lora", action="store_true", help="start the model's engines with LoRA on")
    p.add_argument("--max-loras", type=int, help="adapters one replica holds at once (default 4)")
    p.add_argument("--max-lora-rank", type=int, choices=get_args(LoraRank), help="largest adapter rank (default 16)")
    p.add_argument("--max-cpu-loras", type=int, help="vLLM's CPU cache of adapters (default: --max-loras)")


def registration(args: argparse.Namespace, body_of: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Body of POST /v1/models/register: an adapter's, or the model's (`body_of`) with its LoRA engine arguments."""
    if args.adapter or args.base:
        if not (args.adapter and args.base and args.alias):
            raise SystemExit("svllm register: an adapter needs --adapter, --base and --alias")
        return {"alias": args.alias, "base": args.base, "adapter": args.adapter}
    if not args.model:
        raise SystemExit("svllm register: --model is required (or --adapter with --base)")
    body = body_of()
    for name in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"):
        value = getattr(args, name)
        if value not in (None, False):
            body[name] = value
    return body
