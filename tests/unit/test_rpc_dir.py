"""An engine launch's directory for vLLM's ZMQ socket files (worker/supervisor.py, make_rpc_dir): made in TMPDIR,
and not at all where vLLM's socket paths in it (the directory, "/", a uuid4) would not fit a Unix socket's 107
bytes. The engine's own use of it and its removal are tests/test_engine.py's and tests/unit/test_guard.py's."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverless_vllm.worker.supervisor import make_rpc_dir

SOCKET_PATH_MAX = 107


@pytest.fixture
def short() -> Iterator[Path]:
    """A folder with a short path, as /tmp is (pytest's tmp_path is already too long for the sockets)."""
    folder = Path(tempfile.mkdtemp(prefix="svt-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_launch_gets_a_new_empty_directory_in_tmpdir(short: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    first, second = make_rpc_dir(), make_rpc_dir()
    assert first is not None and second is not None and first != second
    for made in (Path(first), Path(second)):
        assert made.parent == short and made.name.startswith("svllm-rpc-") and list(made.iterdir()) == []
    assert len(f"{first}/{uuid.uuid4()}".encode()) <= SOCKET_PATH_MAX  # what vLLM binds there fits


@pytest.mark.parametrize("room", [0, 1])
def test_a_tmpdir_too_long_for_the_socket_paths_gets_none_and_keeps_nothing(
    short: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    """The longest TMPDIR that fits gets a directory; one byte more, none (and what it tried is removed)."""
    made_length = SOCKET_PATH_MAX - 1 - 36  # the directory's length that leaves room for "/" and a uuid4
    name_length = len("/svllm-rpc-") + 8  # mkdtemp's name: the prefix and 8 random characters
    folder = short / ("d" * (made_length - name_length - len(str(short)) - 1 + room))
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    made = make_rpc_dir()
    if room:
        assert made is None and list(folder.iterdir()) == []
    else:
        assert made is not None and len(f"{made}/{uuid.uuid4()}".encode()) == SOCKET_PATH_MAX
