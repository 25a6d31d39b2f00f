"""gunicorn's uvicorn worker for `svllm router --workers N`, serving with the same protocol as one process does.

A module of its own: the worker class comes from the `uvicorn-worker` package (uvicorn's own `uvicorn.workers` is
deprecated) and imports gunicorn, which only this deployment needs.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from uvicorn_worker import UvicornWorker

from ..config import RouterSettings
from .server_protocol import CoalescingHttpToolsProtocol


# uvicorn-worker ships no type information, so its class is Any to mypy.
class CoalescingUvicornWorker(UvicornWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Built in each worker process (its environment is the router's), not at import.
        self.CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": CoalescingHttpToolsProtocol.configured()}
        super().__init__(*args, **kwargs)


def gunicorn_argv(settings: RouterSettings, keep_alive_s: int) -> list[str]:
    """The command `svllm router --workers N` runs: gunicorn's processes, each building the router from its
    environment (the flags reach them as their variables)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(settings.processes),
        "--worker-class",
        f"{__name__}.CoalescingUvicornWorker",
        "--bind",
        f"{settings.host}:{settings.port}",
        "--graceful-timeout",
        str(math.ceil(settings.drain_timeout_s)),  # gunicorn takes whole seconds
        "--keep-alive",  # gunicorn's default is 2 s (its workers' uvicorn takes it): KEEP_ALIVE_TIMEOUT
        str(keep_alive_s),
        "serverless_vllm.router.app:app_from_env()",
    ]
