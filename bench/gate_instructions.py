"""The tenant gate's own work per request of a limited key (router/tenant_gate.py), counted in CPU instructions.

bench/router_instructions.py counts a whole router process, whose counts move by a few thousand instructions from
one count to the next (its connections, its timers): more than a change to one piece of the gate. This counts the
gate alone, in process, on its real parts (a key ring with one key of rpm, tpm and max_concurrent limits, the
limiter, the usage book), with a whole answer as vLLM writes it: the script runs itself under callgrind with 0 and
with N calls of each piece, and the difference over N is the piece's count. No event loop: each coroutine is run
to its end by hand, and the upstream call returns at once, so the counts are the gate's own.
  serve      TenantGate.serve, less the upstream call alone
  limits     Limiter.admit and Grant.finish
  answered   the answer's side: its usage read and counted (no limits)
  guard      the guard's check of the key's bearer token (security/auth.py), the app behind it doing nothing

    .venv/bin/python bench/gate_instructions.py                    # this tree, 4,000 calls a piece
    .venv/bin/python bench/gate_instructions.py --quick            # 500 calls
    .venv/bin/python bench/gate_instructions.py --base ../base     # and another checkout's code (a same-run A/B)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_state, log, result_header, write_result

SECRET = b"sk-svllm-" + b"x" * 43  # a key's secret as the manager makes them
PIECES = ("call", "serve", "limits", "answered", "guard")
# vLLM's answer to a completion of 8 tokens, as its JSONResponse renders it (compact, UsageInfo's field order).
ANSWER = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "tiny",
    "choices": [{"index": 0, "text": " a b c d e f g h", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 26, "total_tokens": 34, "completion_tokens": 8, "prompt_tokens_details": None},
    "kv_transfer_params": None,
}


def run_to_end(coroutine: Coroutine[Any, Any, Any]) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the coroutine waited: the count would include an event loop")


class Head:
    """Where our server takes the x-ratelimit-* lines (dataplane/server_protocol.py): what it does with them is the
    server's work, not the gate's."""

    def add_head_lines(self, lines: bytes) -> None:
        pass


def pieces() -> dict[str, Callable[[], None]]:
    """Each piece as a call (imports here: the tree counted is the one on sys.path)."""
    from pydantic import SecretStr
    from serverless_vllm.config import AuthSettings
    from serverless_vllm.dataplane.body import InferenceRequest
    from serverless_vllm.dataplane.endpoints import ENDPOINTS
    from serverless_vllm.router.limits import Limiter
    from serverless_vllm.router.tenant_gate import TenantGate, answered
    from serverless_vllm.router.usage import UsageBook
    from serverless_vllm.schemas import KeyLimits, KeyTable
    from serverless_vllm.schemas.keys import KeyEntry, Priority
    from serverless_vllm.security.auth import Authenticator, GuardMiddleware, router_policy
    from serverless_vllm.security.keys import ActiveKey, KeyRing
    from starlette.responses import Response

    limits = KeyLimits(rpm=10_000_000, tpm=10_000_000_000, max_concurrent=100_000)
    entry = KeyEntry(
        id="key-1", name="k", tenant="t", models=["*"], limits=limits, priority=Priority.NORMAL, created_at=1.0,
        prefix="sk-x", digest=hashlib.sha256(SECRET).hexdigest(),
    )  # fmt: skip
    ring = KeyRing()
    ring.update(KeyTable(version=1, epoch="e", keys=[entry]))
    key = ring.check(SECRET)
    assert isinstance(key, ActiveKey)
    gate = TenantGate(Limiter(), UsageBook(lambda alias: alias))
    endpoint = next(e for e in ENDPOINTS if e.path == "/v1/completions")
    payload = {"model": "tiny", "prompt": "hello", "max_tokens": 8}
    request = InferenceRequest(endpoint, json.dumps(payload).encode(), payload, "tiny", "application/json")
    response = Response(json.dumps(ANSWER, separators=(",", ":")).encode(), media_type="application/json")
    row = gate.usage.row(key, "tiny")
    head = Head()

    async def call(_: InferenceRequest) -> Response:
        return response

    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        pass

    secrets = {"api_keys": (SecretStr("env-key-0123456789"),), "admin_key": SecretStr("admin-key-0123456789")}
    auth = Authenticator(AuthSettings(mode="on", worker_token=SecretStr("worker-0123456789"), **secrets), "router")
    guard = GuardMiddleware(nothing, auth, router_policy, keys=ring)
    headers = [(b"host", b"x"), (b"content-length", b"60"), (b"authorization", b"Bearer " + SECRET)]

    def guarded() -> None:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": headers}
        run_to_end(guard(scope, None, None))  # type: ignore[arg-type]

    return {
        "call": lambda: run_to_end(call(request)),
        "serve": lambda: run_to_end(gate.serve(key, request, call, head)),
        "limits": lambda: gate.limiter.admit(key).finish(0),
        "answered": lambda: answered(response, None, row, False, None) and None,
        "guard": guarded,
    }


def counted(tree: Path, piece: str, calls: int) -> int:
    """Instructions of this script run under callgrind with `calls` calls of `piece`."""
    env = {**os.environ, "PYTHONPATH": str(tree / "services")}
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__, "--run", piece,
         str(calls)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = re.search(r"refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind: {done.stderr[-400:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent, help="the checkout counted")
    p.add_argument("--base", type=Path, help="another checkout, counted too (git worktree add ../base <commit>)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--run", nargs=2, metavar=("PIECE", "CALLS"), help=argparse.SUPPRESS)  # under callgrind
    a = p.parse_args()
    if a.run:
        piece, calls = pieces()[a.run[0]], int(a.run[1])
        for _ in range(50):  # warm: every path specialised, every row and state made
            piece()
        for _ in range(calls):
            piece()
        return
    calls = 500 if a.quick else 4000
    trees = {"tree": a.tree, **({"base": a.base} if a.base else {})}
    counts: dict[str, dict[str, int]] = {}
    for name, tree in trees.items():
        per_call = {piece: (counted(tree, piece, calls) - counted(tree, piece, 0)) / calls for piece in PIECES}
        per_call["serve"] -= per_call["call"]
        counts[name] = {piece: round(v) for piece, v in per_call.items()}
        log(f"{name} ({tree}): {json.dumps(counts[name])}")
    result = {
        **result_header("gate_instructions"),
        "settings": {"calls": calls, **{name: {"path": str(t), **git_state(t)} for name, t in trees.items()}},
        "instructions_per_call": counts,
    }
    write_result("gate_instructions" + ("_quick" if a.quick else ""), result)


if __name__ == "__main__":
    main()
