"""gunicorn's uvicorn worker for `svllm router --workers N`, serving with the same protocol as one process does.

A module of its own: uvicorn.workers imports gunicorn (and warns that it is deprecated), which only this
deployment needs.
"""

from __future__ import annotations

from typing import Any

from uvicorn.workers import UvicornWorker

from .server_protocol import CoalescingHttpToolsProtocol


class CoalescingUvicornWorker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, "http": CoalescingHttpToolsProtocol}
