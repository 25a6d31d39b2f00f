"""A test double of the Hugging Face hub's file API, on loopback: the endpoints huggingface_hub calls (and vLLM
through it) to describe a model repository and download its files, so that the download path is tested without
the internet (`HF_ENDPOINT` points the hub client here). Not the hub: one commit per repository (its default branch
`main`), no redirects to a CDN, no Xet storage, no pagination, no authentication.

    GET       /api/models/{repo}[/revision/{rev}]    model info: its commit (`sha`), its files (`siblings`, with
                                                     sizes, blob ids and LFS data: as with ?blobs=true)
    GET       /api/models/{repo}/tree/{rev}[/{dir}]  its files, recursively (list_repo_files, snapshot_download)
    HEAD, GET /{repo}/resolve/{rev}/{path}           a file, with the headers hf_hub_download needs: X-Repo-Commit,
                                                     ETag, Content-Length (and X-Linked-Etag, X-Linked-Size for LFS
                                                     files: the *.safetensors here)

Errors as the hub gives them: 404 with X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound (which
huggingface_hub turns into RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError). Every request is
recorded (`requests`), so a test can tell what a client downloaded and when.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_CHUNK = 64 * 1024


class _File:
    def __init__(self, path: str, data: bytes, claimed_size: int | None) -> None:
        self.path = path
        self.data = data
        self.size = len(data) if claimed_size is None else claimed_size  # what the listings say
        self.blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
        self.lfs = path.endswith(".safetensors")
        self.sha256 = hashlib.sha256(data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def listing(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return out

    def sibling(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.blob_id}
        if self.lfs:
            out["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": 134}
        return out


class HubDouble:
    """`repos`: repository id -> a folder whose files (hidden ones aside) are that repository's. `claimed_sizes`:
    (repository, file) -> the size the listings give instead of the real one (a model too big for a disk).
    `chunk_delay_s`: a pause after each 64 KiB of a file sent (a download slow enough to watch). `answer_delay_s`: a
    pause before each answer (a slow hub). Faults: `fail`."""

    def __init__(
        self,
        repos: dict[str, Path],
        *,
        claimed_sizes: dict[tuple[str, str], int] | None = None,
        chunk_delay_s: float = 0.0,
    ) -> None:
        claimed = claimed_sizes or {}
        self.repos: dict[str, dict[str, _File]] = {}
        for repo, folder in repos.items():
            paths = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
            self.repos[repo] = {
                p: _File(p, (folder / p).read_bytes(), claimed.get((repo, p))) for p in paths if not p.startswith(".")
            }
        self.chunk_delay_s = chunk_delay_s
        self.answer_delay_s = 0.0
        self._failing: tuple[int, str, int | None] | None = None  # fail(): status, where, how many more
        self.requests: list[tuple[str, str]] = []  # (method, path), in arrival order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    @staticmethod
    def snapshot(hf_home: Path, repo: str) -> Path:
        """Where huggingface_hub keeps the repository's files under HF_HOME, at the stand-in's one commit."""
        return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / HubDouble.commit(repo)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> HubDouble:
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (a second stop does nothing: socketserver's shutdown() waits forever for a loop that is
        not running, which hung a failed test's teardown after its outage)."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread = None

    def resume(self) -> HubDouble:
        """Listen again at the same address after stop(): the hub back after an outage."""
        self._server = ThreadingHTTPServer(self._server.server_address[:2], _handler(self))
        self._server.daemon_threads = True
        return self.start()

    def fail(self, status: int | None, *, where: str = "", times: int | None = None) -> None:
        """Answer `status` (503: a proxy or mirror whose upstream is gone) to the requests whose path contains
        `where`: the next `times` of them, or all until fail(None)."""
        with self._lock:
            self._failing = None if status is None else (status, where, times)

    def _failure(self, path: str) -> int | None:
        with self._lock:
            if self._failing is None or self._failing[1] not in path:
                return None
            status, where, times = self._failing
            if times is not None:
                self._failing = (status, where, times - 1) if times > 1 else None
            return status

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def downloads(self, since: int = 0) -> list[str]:
        """The file bodies sent (GET .../resolve/...) from request number `since` on."""
        with self._lock:
            return [path for method, path in self.requests[since:] if method == "GET" and "/resolve/" in path]

    # ------------------------------------------------------------------ routing

    def route(self, method: str, raw_path: str) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
        failure = self._failure(raw_path)
        if failure is not None:
            return _error(failure, None, "upstream unavailable")
        parts = [unquote(p) for p in urlsplit(raw_path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            repo, rest = self._repo(parts[2:])
            if repo not in self.repos:
                return _error(404, "RepoNotFound", "Repository not found")
            if not rest:
                rest = ["revision", "main"]
            if len(rest) >= 2 and rest[0] in ("revision", "tree"):
                if rest[1] not in ("main", self.commit(repo)):
                    return _error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                files = self.repos[repo]
                if rest[0] == "revision":
                    info = {
                        "id": repo,
                        "modelId": repo,
                        "sha": self.commit(repo),
                        "private": False,
                        "gated": False,
                        "disabled": False,
                        "tags": [],
                        "siblings": [f.sibling() for f in files.values()],
                    }
                    return _json(info)
                under = "/".join(rest[2:])
                return _json([f.listing() for p, f in files.items() if not under or p.startswith(under + "/")])
            return _error(404, None, "Not found")
        repo, rest = self._repo(parts)
        if len(rest) >= 3 and rest[0] == "resolve":
            if repo not in self.repos:
                return _error(404, "RepoNotFound", "Repository not found")
            if rest[1] not in ("main", self.commit(repo)):
                return _error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
            file = self.repos[repo].get("/".join(rest[2:]))
            if file is None:
                status, headers, body = _error(404, "EntryNotFound", "Entry not found")
                return status, {**headers, "X-Repo-Commit": self.commit(repo)}, body
            headers = {
                "X-Repo-Commit": self.commit(repo),
                "ETag": f'"{file.etag}"',
                "Content-Length": str(len(file.data)),
                "Content-Type": "application/octet-stream",
            }
            if file.lfs:
                headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data))}
            return 200, headers, b"" if method == "HEAD" else self._chunks(file.data)
        return _error(404, None, "Not found")

    def _repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """The repository id at the head of a path (one of ours if it matches, else its first two parts)."""
        for repo in self.repos:
            n = repo.count("/") + 1
            if "/".join(parts[:n]) == repo:
                return repo, parts[n:]
        return "/".join(parts[:2]), parts[2:]

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), _CHUNK):
            yield data[start : start + _CHUNK]
            if self.chunk_delay_s:
                time.sleep(self.chunk_delay_s)


def _json(value: Any) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps(value).encode()
    return 200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body


def _error(status: int, code: str | None, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": message}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "X-Error-Message": message}
    if code is not None:
        headers["X-Error-Code"] = code
    return status, headers, body


def _handler(hub: HubDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, method: str) -> None:
            hub.record(method, self.path)
            time.sleep(hub.answer_delay_s)
            status, headers, body = hub.route(method, self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if method == "HEAD":
                return
            try:
                if isinstance(body, bytes):
                    self.wfile.write(body)
                else:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a download killed): nothing to send it

        def do_GET(self) -> None:
            self._answer("GET")

        def do_HEAD(self) -> None:
            self._answer("HEAD")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # `requests` records them

    return Handler
