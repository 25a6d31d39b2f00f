"""One-shot `init` service: register DEFAULT_MODEL under DEFAULT_ALIAS with the router.

Environment: ROUTER_URL (http://head:8000), DEFAULT_MODEL (HF id or a path such as
/models/NAME; empty = nothing to do), DEFAULT_ALIAS, DEFAULT_MAX_MODEL_LEN (optional),
SVLLM_ADMIN_KEY (sent as a bearer token when set). Idempotent: an alias that is already
registered (listed by GET /v1/models, or answered 409) counts as done. Standard library only.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

url = os.environ.get("ROUTER_URL", "http://head:8000").rstrip("/")
model = os.environ.get("DEFAULT_MODEL", "").strip()
alias = os.environ.get("DEFAULT_ALIAS", "").strip() or "default"
max_len = os.environ.get("DEFAULT_MAX_MODEL_LEN", "").strip()
key = os.environ.get("SVLLM_ADMIN_KEY", "").strip() or os.environ.get("SVLLM_API_KEY", "").strip()

if not model:
    print("DEFAULT_MODEL is empty: nothing to register")
    sys.exit(0)

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


deadline = time.monotonic() + float(os.environ.get("INIT_TIMEOUT", "300"))
while True:
    try:
        status, text = call("GET", "/v1/models")
        if status == 200:
            ids = {m.get("id") for m in json.loads(text).get("data", [])}
            if alias in ids:
                print(f"model alias {alias!r} already registered")
                sys.exit(0)
        body = {"alias": alias, "model_name": model}
        if max_len:
            body["max_model_len"] = int(max_len)
        status, text = call("POST", "/v1/models/register", body)
        if status in (200, 201, 409):
            print(f"register {alias!r} -> {model!r}: HTTP {status} {text[:500]}")
            sys.exit(0)
        print(f"register {alias!r}: HTTP {status} {text[:500]}", file=sys.stderr)
        if 400 <= status < 500 and status not in (404, 408, 429):
            sys.exit(1)
    except (OSError, ValueError) as e:
        print(f"router not ready: {e}", file=sys.stderr)
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(3)
