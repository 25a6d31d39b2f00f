"""`svllm register`'s and `svllm patch`'s serving flags: the model's serverless policy (schemas.ModelPolicy:
replicas, idle timeout, routing, preload) and vLLM's scheduling policy (registration only). A flag left out leaves
its field as it is (the manager's default at registration)."""

from __future__ import annotations

import argparse

from .schemas import Routing, SchedulingPolicy

# flag -> (ModelPolicy field, type, help)
_POLICY_FLAGS: dict[str, tuple[str, type, str]] = {
    "--min-replicas": ("min_replicas", int, "never fewer awake replicas (default 0: scale to zero)"),
    "--max-replicas": ("max_replicas", int, "never more replicas (default 1; an adapter's: every base replica)"),
    "--idle-timeout": ("idle_timeout_s", float, "seconds without traffic before scaling down (default 300)"),
    "--target-concurrency": ("target_concurrency", float, "in flight + queued per replica above which one is added"),
}


def add_policy_flags(p: argparse.ArgumentParser, scheduling: bool = True) -> None:
    """The policy's flags; `scheduling`: and vLLM's scheduling policy (an engine argument: registration only)."""
    for flag, (field, kind, text) in _POLICY_FLAGS.items():
        p.add_argument(flag, dest=field, type=kind, metavar=flag[2:].upper().replace("-", "_"), help=text)
    p.add_argument(
        "--routing",
        choices=[r.value for r in Routing],
        help="how requests choose among its ready replicas (default: session)",
    )
    p.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        help="start one replica at registration, an adapter: load it into a free slot of its base once that is ready "
        "(default: yes; --no-preload: at its first request)",
    )
    if not scheduling:
        return
    p.add_argument(
        "--scheduling-policy",
        choices=[s.value for s in SchedulingPolicy],
        default=SchedulingPolicy.FCFS.value,
        help="vLLM's order of waiting requests: fcfs, or priority (by the priority class of each request's key)",
    )


def policy_given(args: argparse.Namespace) -> dict[str, object]:
    """The policy's fields whose flags were given (a PATCH's body)."""
    fields = (*(f for f, _, _ in _POLICY_FLAGS.values()), "routing", "preload")
    return {field: value for field in fields if (value := getattr(args, field)) is not None}


def add_policy(body: dict[str, object], args: argparse.Namespace) -> None:
    """The flags given, into a registration's body (an adapter's takes its policy, not an engine's scheduling)."""
    body.update(policy_given(args))
    if args.scheduling_policy != SchedulingPolicy.FCFS.value:
        if "adapter" in body:
            raise SystemExit("svllm register: an adapter is scheduled as its base (--scheduling-policy is the base's)")
        body["scheduling_policy"] = args.scheduling_policy
