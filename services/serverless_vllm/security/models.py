"""What a registration may ask a worker to run: which models (hub ids, or paths under allowed directories) and
which extra engine arguments (none that rebind the engine, load code or read/write arbitrary files).

Checked by the manager when a model is registered (every deployment mode goes through it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from ..errors import APIError
from ..schemas import ModelSpec

# A Hugging Face repository id: "name" or "org/name"; letters, digits, '.', '_', '-', no '..' or '--'.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID_PATTERN = rf"^{_PART}(?:/{_PART})?$"
_HUB_ID_RE = re.compile(HUB_ID_PATTERN)


def is_hub_id(weights: str) -> bool:
    """Whether a registration's weights (a model's or an adapter's) name a hub repository rather than a folder: the
    one rule for it, which the manager's prefetch and the workers' downloads follow (a registration's weights are a
    hub id or an absolute path: check_model_name)."""
    return not weights.startswith("/")


# Engine flags a registration may not set. The worker owns the engine's address, name and model; the rest
# import code, open network connectors or read/write files on the worker chosen by whoever registers.
# Operators who need one pass it on the worker itself (ENGINE_EXTRA_ARGS), which is trusted.
DENIED_ENGINE_FLAGS = frozenset(
    {
        # owned by the worker
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--uds",
        "--grpc-port",
        "--api-key",
        "--root-path",
        "--config",
        "--enable-sleep-mode",
        "--headless",
        "--runner",  # these three: the registration's `task` (worker/engine.py: TASK_ARGS)
        "--convert",
        "--task",
        "--load-format",  # the registration's `load_format` (one of schemas.LoadFormat: the others read other files)
        "--revision",  # the registration's `revision` (what the workers prefetch is what the engine loads)
        "--scheduling-policy",  # the registration's `scheduling_policy` (the router must know it: key priorities)
        "--enable-lora",  # these four: the registration's LoRA fields (manager/adapters.py loads the adapters)
        "--max-loras",
        "--max-lora-rank",
        "--max-cpu-loras",
        # code loaded from a name or a path
        "--trust-remote-code",
        "--middleware",
        "--worker-cls",
        "--worker-extension-cls",
        "--scheduler-cls",
        "--logits-processors",
        "--tool-parser-plugin",
        "--reasoning-parser-plugin",
        "--io-processor-plugin",
        "--model-class-overrides",
        "--trust-request-chat-template",
        "--trust-request-mm-kwargs",
        # files read or written on the worker
        "--tokenizer",
        "--download-dir",
        "--hf-config-path",
        "--allowed-local-media-path",
        "--lora-modules",
        "--log-config-file",
        "--logging-config",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
        "--spec-model",
        "--speculative-config",
        "--mm-encoder-fp8-scale-path",
        "--mm-encoder-fp8-scale-save-path",
        # network connectors
        "--kv-transfer-config",
        "--ec-transfer-config",
        "--kv-events-config",
        "--weight-transfer-config",
    }
)


def _refuse(message: str, code: str) -> APIError:
    return APIError(400, message, code)


def check_model_name(name: str, model_dirs: Iterable[str]) -> None:
    """A hub id, or an absolute path that lies under one of `model_dirs` (lexically, and after symlinks when
    the path exists on this host). No '..' anywhere."""
    if "\x00" in name or any(ord(c) < 32 for c in name):
        raise _refuse("model_name contains control characters", "model_not_allowed")
    if is_hub_id(name):
        if _HUB_ID_RE.match(name) and ".." not in name and "--" not in name:
            return
        raise _refuse(
            "model_name must be a Hugging Face id ('org/name') or an absolute path under one of the "
            "directories in SVLLM_MODEL_DIRS",
            "model_not_allowed",
        )
    if ".." in name.split("/"):
        raise _refuse("model_name must not contain '..'", "model_not_allowed")
    dirs = [os.path.normpath(d) for d in model_dirs if d.startswith("/")]
    if not dirs:
        raise _refuse(
            "local model paths are not allowed here (no SVLLM_MODEL_DIRS configured): use a Hugging Face id",
            "model_not_allowed",
        )
    path = os.path.normpath(name)
    for root in dirs:
        if _under(path, root) and (not os.path.exists(path) or _under(os.path.realpath(path), os.path.realpath(root))):
            return
    raise _refuse(
        f"model_name must lie under one of the allowed model directories ({', '.join(dirs)})", "model_not_allowed"
    )


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _flag_name(arg: str) -> str:
    # vLLM accepts --a_b for --a-b, --flag=value and dotted JSON keys (--flag.key value).
    return arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-").lower()


def check_engine_args(args: Iterable[str]) -> None:
    for arg in args:
        if not arg.startswith("--"):
            continue
        flag = _flag_name(arg)
        # argparse also takes unambiguous abbreviations (--ho for --host): refuse any prefix of a denied flag.
        denied = [d for d in DENIED_ENGINE_FLAGS if d == flag or (len(flag) > 2 and d.startswith(flag))]
        if denied:
            raise _refuse(
                f"engine argument {flag!r} is not allowed in a registration (the worker sets it, or it "
                "loads code or files); an operator can set it in the worker's ENGINE_EXTRA_ARGS",
                "engine_arg_not_allowed",
            )


def check_registration(spec: ModelSpec, model_dirs: Iterable[str]) -> None:
    check_model_name(spec.model_name, model_dirs)
    check_engine_args(spec.extra_args)
    if spec.revision is not None:
        if not is_hub_id(spec.model_name):
            raise _refuse("revision applies to Hugging Face models, not to a local path", "revision_not_allowed")
        if ".." in spec.revision:  # it names a file under the cache's refs/
            raise _refuse("revision must not contain '..'", "revision_not_allowed")
