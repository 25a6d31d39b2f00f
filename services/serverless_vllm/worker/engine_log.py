"""An engine's log: every line its process prints, appended to a local file and kept in a short in-memory tail
(which rides along in the engine's status when something went wrong)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 200
LAUNCH_HEADER = "=== serverless-vllm launch"

_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|\bERROR\b")
_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s*")


class EngineLog:
    """The log file (if it can be written) and the last LOG_TAIL_LINES lines of one engine, over its launches."""

    def __init__(self, name: str) -> None:
        self._name = name  # the replica's, for log messages
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._file: IO[str] | None = None

    def open(self, path: Path) -> None:
        # A local append-only file, line buffered: cheap enough to write from the event loop.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            log.warning("engine %s: cannot write %s: %s", self._name, path, exc)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def write(self, text: str) -> None:
        self._tail.append(text)
        if self._file is not None:
            try:
                self._file.write(text + "\n")
            except (OSError, ValueError):
                self._file = None  # disk full or closed: keep the in-memory tail

    def write_launch(self, number: int, cmd: Sequence[str]) -> None:
        """The header that starts each launch's lines."""
        self.write(f"{LAUNCH_HEADER} {number} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}")

    def tail(self, n: int = 50) -> list[str]:
        if n <= 0:
            return []
        return list(self._tail)[-n:]

    def last_error(self) -> str | None:
        """The last error line of the current launch, the likely reason it exited."""
        for line in reversed(self._tail):
            if line.startswith(LAUNCH_HEADER):
                break  # only this launch's own lines explain this exit
            if _ERROR_LINE.search(line) and "Traceback (most recent call last)" not in line:
                return _LOG_PREFIX.sub("", line.strip())
        return None

    async def pump(self, stream: asyncio.StreamReader) -> None:
        """Copy the process's output here, line by line, until it closes."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the stream limit: keep going with the next one
                self.write("[serverless-vllm: over-long log line dropped]")
                continue
            if not line:
                return
            self.write(line.decode("utf-8", "replace").rstrip("\r\n"))
