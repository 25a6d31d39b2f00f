"""One-shot `init` service: register DEFAULT_MODEL under DEFAULT_ALIAS with the router, and
DEFAULT_EMBED_MODEL under DEFAULT_EMBED_ALIAS as an embedding model (task "embed").

Environment: ROUTER_URL (http://head:8000), DEFAULT_MODEL (HF id or a path such as
/models/NAME; empty = no chat model), DEFAULT_ALIAS, DEFAULT_MAX_MODEL_LEN (optional),
DEFAULT_EMBED_MODEL (optional; empty = no embedding model), DEFAULT_EMBED_ALIAS (default "embed"),
SVLLM_ADMIN_KEY (sent as a bearer token when set). Idempotent: an alias that is already
registered (listed by GET /v1/models, or answered 409) counts as done. Standard library only.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request


def env(name, default=""):
    return os.environ.get(name, "").strip() or default


url = env("ROUTER_URL", "http://head:8000").rstrip("/")
key = env("SVLLM_ADMIN_KEY") or env("SVLLM_API_KEY")
pending = []  # registration bodies (POST /v1/models/register) not registered yet
if env("DEFAULT_MODEL"):
    body = {"alias": env("DEFAULT_ALIAS", "default"), "model_name": env("DEFAULT_MODEL")}
    if env("DEFAULT_MAX_MODEL_LEN"):
        body["max_model_len"] = int(env("DEFAULT_MAX_MODEL_LEN"))
    pending.append(body)
if env("DEFAULT_EMBED_MODEL"):
    pending.append(
        {"alias": env("DEFAULT_EMBED_ALIAS", "embed"), "model_name": env("DEFAULT_EMBED_MODEL"), "task": "embed"}
    )

if not pending:
    print("DEFAULT_MODEL and DEFAULT_EMBED_MODEL are empty: nothing to register")
    sys.exit(0)
if len({b["alias"] for b in pending}) < len(pending):
    print(f"DEFAULT_ALIAS and DEFAULT_EMBED_ALIAS must differ (both {pending[0]['alias']!r})", file=sys.stderr)
    sys.exit(1)

headers = {"Content-Type": "application/json"}
if key:
    headers["Authorization"] = f"Bearer {key}"


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def register(body):
    """True when done, False to try again later; exits on a refusal that will not change."""
    alias, model = body["alias"], body["model_name"]
    status, text = call("GET", "/v1/models")
    if status == 200 and alias in {m.get("id") for m in json.loads(text).get("data", [])}:
        print(f"model alias {alias!r} already registered")
        return True
    status, text = call("POST", "/v1/models/register", body)
    if status in (200, 201, 409):
        task = f" (task {body['task']})" if "task" in body else ""
        print(f"register {alias!r} -> {model!r}{task}: HTTP {status} {text[:500]}")
        return True
    print(f"register {alias!r}: HTTP {status} {text[:500]}", file=sys.stderr)
    if 400 <= status < 500 and status not in (404, 408, 429):
        sys.exit(1)
    return False


deadline = time.monotonic() + float(env("INIT_TIMEOUT", "300"))
while True:
    try:
        while pending and register(pending[0]):
            pending.pop(0)
        if not pending:
            sys.exit(0)
    except (OSError, ValueError) as e:
        print(f"router not ready: {e}", file=sys.stderr)
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(3)
