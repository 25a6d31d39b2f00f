"""An engine's log: every line its process prints, appended to a local file and kept in a short in-memory tail
(which rides along in the engine's status when something went wrong).

The file is rotated at a size cap: `<replica>.log` is renamed `<replica>.log.1` (the older ones move up one,
the oldest beyond the count kept is deleted) and a fresh file starts. The tail is memory only and never rotated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import MAX_NAMED_ERRORS, field_error

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 200
LAUNCH_HEADER = "=== serverless-vllm launch"

# An exception's line, a line with an ERROR level, or argparse's refusal (`api_server.py: error: unrecognized
# arguments: ...`, after a usage of hundreds of lines, one of which lists ERROR among --log-level's choices).
_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b|\bERROR\b|^\S+: error: ")
_PROCESS_PREFIX = re.compile(r"^\(\w+ pid=\d+\) ")  # how an engine's own processes prefix their lines
_LOGGER_HEAD = re.compile(r"^(ERROR|WARNING|INFO|DEBUG|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] ")
# vLLM's last lines when an engine process failed to start ("See root cause above") or its engine core died while
# serving (EngineDeadError's "See stack trace (above) for the root cause"): the reason is an error before it.
_POINTS_UP = re.compile(r"See root cause above|See stack trace \(above\)")
# What the API server logs (as a warning) when its engine core process is gone without a word (killed: the kernel's
# out-of-memory killer, a signal): the reason of an EngineDeadError where no error of the engine core precedes it.
_CORE_GONE = "engine core exited unexpectedly"
CORE_GONE_REASON = "vLLM's engine core process exited unexpectedly (killed, or crashed without a Python error)"
_TRACEBACK = "Traceback (most recent call last)"
# Pydantic's first line of a ValidationError (vLLM checks its arguments with pydantic): what is wrong follows it.
_VALIDATION_HEADER = re.compile(r"\b(\d+) validation errors? for \S+$")
# Reasons a start fails for however the engine is started (forked or plain, see start_fault): vLLM refused its
# arguments (argparse, or pydantic on one of its *Config classes), or the model is not there (vLLM's, transformers'
# and the Hugging Face hub's words for a missing folder, repository, revision, file, access or connection).
_START_FAULT = re.compile(
    r"(\S+: error: |.*\bvalidation errors? for \w*Config\b"
    r"|.*(Invalid repository ID or local directory|is not a local folder and is not a valid model identifier"
    r"|is not a valid git identifier|gated repo|does not appear to have a file named|couldn't connect to '"
    r"|(RepositoryNotFound|RevisionNotFound|GatedRepo|LocalEntryNotFound|EntryNotFound|HFValidation)Error\b))"
)


class EngineLog:
    """The log file (if it can be written) and the last LOG_TAIL_LINES lines of one engine, over its launches."""

    def __init__(self, name: str, max_bytes: int = 0, backups: int = 0) -> None:
        """`max_bytes`: the file's size at which it is rotated (0: never); `backups`: rotated files kept."""
        self._name = name  # the replica's, for log messages
        self._tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._size = 0  # bytes in the current file, what was there before it was opened included
        self._max_bytes = max_bytes
        self._backups = backups

    def open(self, path: Path) -> None:
        # A local append-only file, one write per line (unbuffered): cheap enough to write from the event loop.
        # Opened again (another launch, a new worker process) it continues the same file: its size counts.
        self.close()
        self._path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab", buffering=0)
            self._size = self._file.seek(0, os.SEEK_END)
        except OSError as exc:
            log.warning("engine %s: cannot write %s: %s", self._name, path, exc)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def write(self, text: str) -> None:
        self._tail.append(text)
        if self._file is None:
            return
        data = (text + "\n").encode("utf-8", "replace")
        if 0 < self._max_bytes < self._size + len(data) and self._size > 0:
            self._rotate()
            if self._file is None:
                return
        try:
            self._file.write(data)
            self._size += len(data)
        except (OSError, ValueError):
            self._file = None  # disk full or closed: keep the in-memory tail

    def _rotate(self) -> None:
        """<path>.{N-1} -> <path>.N (the oldest is replaced), ..., <path> -> <path>.1, then a fresh <path>."""
        path = self._path
        assert path is not None  # set by open(), before any file
        self.close()
        try:
            for i in range(self._backups - 1, 0, -1):
                older = path.with_name(f"{path.name}.{i}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
            if self._backups > 0:
                os.replace(path, path.with_name(f"{path.name}.1"))
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("engine %s: cannot rotate %s: %s", self._name, path, exc)
        try:
            self._file = open(path, "ab", buffering=0)
        except OSError as exc:
            log.warning("engine %s: cannot write %s: %s", self._name, path, exc)
        self._size = 0  # a fresh file; or, when the renaming failed, the next try is max_bytes later

    def write_launch(self, number: int, cmd: Sequence[str]) -> None:
        """The header that starts each launch's lines."""
        self.write(f"{LAUNCH_HEADER} {number} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}")

    def tail(self, n: int = 50) -> list[str]:
        if n <= 0:
            return []
        return list(self._tail)[-n:]

    def last_error(self) -> str | None:
        """The last error line of the current launch, the likely reason it exited: the root cause where vLLM's last
        line points up to it, and what a validation error's next lines say is wrong (its first line says only how
        many errors there are)."""
        lines = list(self._tail)
        pointer = None  # vLLM's "see ... above", said when nothing above it says more
        logged_trace = None  # the prefix of the pointer's traceback, logged with a message above it (not a reason)
        for i in range(len(lines) - 1, -1, -1):
            line = lines[i]
            if line.startswith(LAUNCH_HEADER):
                break  # only this launch's own lines explain this exit
            if pointer is not None and _CORE_GONE in line:
                return CORE_GONE_REASON
            # vLLM's logger writes its level, time and place: a message it logged as an error is one, but not the
            # frames of a traceback it logged with it.
            text = _PROCESS_PREFIX.sub("", line.rstrip())
            head = _LOGGER_HEAD.match(text)
            error = text[head.end() :] if head else text
            if logged_trace is not None and line.startswith(logged_trace) and not error[:1].isspace():
                logged_trace = None
                continue  # the message the pointer's traceback was logged with ("AsyncLLM output_handler failed.")
            logged = head is not None and head[1] in ("ERROR", "CRITICAL") and not error[:1].isspace()
            if pointer is not None and error.startswith(_TRACEBACK) and head is not None:
                logged_trace = line.rstrip()[: -len(error)]  # the process prefix and the logger's head
            if not (logged or _ERROR_LINE.search(error)) or _TRACEBACK in error:
                continue
            error = error.strip()
            if _POINTS_UP.search(error):
                pointer = pointer or error
                continue
            header = _VALIDATION_HEADER.search(error)
            if header is not None and (wrong := _validation_errors(int(header[1]), lines[i + 1 :])):
                error += ": " + wrong
            return error
        return pointer

    async def pump(self, stream: asyncio.StreamReader) -> None:
        """Copy the process's output here, line by line, until it closes."""
        await pump_lines(stream, self.write)


def _validation_errors(count: int, lines: list[str]) -> str:
    """Pydantic's lines after a ValidationError's first one, as `field: what is wrong; ...` (a field's name unindented,
    its message indented, then a link to pydantic's documentation; an error of the whole object has no name)."""
    found: list[str] = []
    field = ""
    for line in lines[: 3 * count]:
        text = _PROCESS_PREFIX.sub("", line)
        if not text.startswith(" "):
            if field:
                break  # two names in a row: not pydantic's lines any more
            field = text.strip()
            continue
        text = text.strip()
        if not text.startswith("For further information"):
            found.append(field_error(field, text.partition(" [type=")[0]))
            field = ""
            if len(found) == min(count, MAX_NAMED_ERRORS):
                break
    return "; ".join(found)


def start_fault(returncode: int, error: str | None) -> bool:
    """Whether a start that ended before it was ready, its process with `returncode` and its log with `error` (its
    last_error), would fail the same way started again: its arguments or its model, not the way it was started. An
    engine killed by a signal says nothing about its arguments."""
    return returncode >= 0 and error is not None and _START_FAULT.match(error) is not None


async def pump_lines(stream: asyncio.StreamReader, write: Callable[[str], None]) -> None:
    """Hand a process's output to `write`, line by line, until it closes."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the stream limit: keep going with the next one
            write("[serverless-vllm: over-long log line dropped]")
            continue
        if not line:
            return
        write(line.decode("utf-8", "replace").rstrip("\r\n"))
