"""An ASGI app served on loopback as the services serve theirs: `cli._server` (uvicorn with the services' protocol)
in this test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from serverless_vllm import cli
from serverless_vllm.testing.ports import free_port


@contextlib.asynccontextmanager
async def served(app: Any, naming_no_protocol: bool = False) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    """The server and its URL, until the block ends (then the server is stopped). `naming_no_protocol`: a server
    whose Config names no HTTP protocol (uvicorn's default), as Ray Serve builds its own."""
    port = free_port()
    if naming_no_protocol:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    else:
        server = cli._server(app, "127.0.0.1", port, "warning")
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # uvicorn says nothing when it is up; poll its flag, for 5 s at most
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
