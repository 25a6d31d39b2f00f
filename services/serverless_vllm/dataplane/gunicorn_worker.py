"""gunicorn's uvicorn worker for `svllm router --workers N`, serving with the same protocol as one process does.

A module of its own: the worker class comes from the `uvicorn-worker` package (uvicorn's own `uvicorn.workers` is
deprecated) and imports gunicorn, which only this deployment needs.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from .server_protocol import CoalescingHttpToolsProtocol


# uvicorn-worker ships no type information, so its class is Any to mypy.
class CoalescingUvicornWorker(UvicornWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Built in each worker process (its environment is the router's), not at import.
        self.CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": CoalescingHttpToolsProtocol.configured()}
        super().__init__(*args, **kwargs)
