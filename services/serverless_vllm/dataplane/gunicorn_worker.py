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
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, "http": CoalescingHttpToolsProtocol}
