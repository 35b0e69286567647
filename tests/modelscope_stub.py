"""A stand-in ModelScope hub on loopback, serving model repositories from local folders to the real
modelscope client.

It implements the `/api/v1` calls that modelscope 1.40.2 / modelscope-hub 0.5.1 make for a snapshot
download (read from `modelscope_hub/_legacy_api.py` and `_download.py`):

- `GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=`  the file list (Path, Size, Sha256)
- `GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=`  a file's bytes; `Range: bytes=N-` gets 206
- `GET /api/v1/repos/internalAccelerationInfo`  the Alibaba-cloud region probe (answers "no region")
- `GET /api/v1/models/{owner}/{name}` and `.../revisions`  repository info, as older clients ask for

Every request is recorded in `log` so tests can see what the client really called. `stall_once`
makes the next full download of one file stop after some bytes and hang, as a dropped network does."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    status: int = 0
    body_bytes: int = 0


@dataclass
class _Stall:
    file_path: str
    after_bytes: int
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class StubHub:
    """The hub: `add_repo()` the models, `start()`, point the client at `url`, `stop()`."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.log: list[Request] = []
        self._stall: _Stall | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ setup

    def add_repo(self, model_id: str, folder: str | Path) -> None:
        """Serves every file under `folder` as repository `model_id` (revision master)."""
        root = Path(folder)
        self.repos[model_id] = {p.relative_to(root).as_posix(): p.read_bytes()
                                for p in sorted(root.rglob("*")) if p.is_file()}

    def stall_once(self, file_path: str, after_bytes: int) -> _Stall:
        """The next non-ranged download of `file_path` sends `after_bytes` bytes, then hangs until released."""
        self._stall = _Stall(file_path, after_bytes)
        return self._stall

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            stub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="modelscope-stub", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._stall is not None:
            self._stall.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------ queries for tests

    def calls(self) -> list[str]:
        """'GET /path?Key=...' per request, in order (query keys only, values dropped)."""
        with self._lock:
            return [f"{r.method} {r.path}" + (f"?{'&'.join(sorted(r.query))}" if r.query else "") for r in self.log]

    def downloads(self, file_path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if r.path.endswith("/repo") and "FilePath" in r.query
                    and (file_path is None or r.query["FilePath"] == file_path)]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


class _Handler(BaseHTTPRequestHandler):
    stub: StubHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # the log list is the record; keep stderr quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # ------------------------------------------------------------ routing

    def _dispatch(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        request = Request(self.command, path, query, self.headers.get("Range"))
        self.stub._record(request)
        if path == "/api/v1/repos/internalAccelerationInfo":
            return self._json(request, 200, {"Code": 200, "Data": {"InternalRegionQueryAddress": ""},
                                             "Success": True})
        m = re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)(/revisions|/repo/files|/repo)?", path)
        if not m:
            return self._error(request, 404, f"no route {path}")
        model_id, suffix = f"{m.group(1)}/{m.group(2)}", m.group(3) or ""
        files = self.stub.repos.get(model_id)
        if files is None:
            # What ModelScope answers for an unknown repository: 404 with its business-code body.
            return self._error(request, 404, f"model {model_id} does not exist", code=10010205001)
        if suffix == "":
            return self._json(request, 200, {"Code": 200, "Success": True, "Data": {
                "Path": m.group(1), "Name": m.group(2), "Revision": COMMIT}})
        if suffix == "/revisions":
            return self._json(request, 200, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                "Branches": [{"Revision": "master", "CreatedAt": 1717000000}], "Tags": []}}})
        revision = query.get("Revision", "master")
        if revision not in ("master", COMMIT):
            return self._error(request, 404, f"revision {revision} not found")
        if suffix == "/repo/files":
            return self._json(request, 200, {"Code": 200, "Success": True, "Data": {"Files": _listing(files)}})
        file_path = query.get("FilePath", "")
        if file_path not in files:
            return self._error(request, 404, f"file {file_path} not found")
        return self._file(request, file_path, files[file_path], head)

    # ------------------------------------------------------------ answers

    def _json(self, request: Request, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        request.status, request.body_bytes = status, len(data)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, request: Request, status: int, message: str, code: int | None = None) -> None:
        self._json(request, status, {"Code": code or status, "Message": message, "Success": False,
                                     "RequestId": "stub"})

    def _file(self, request: Request, file_path: str, data: bytes, head: bool) -> None:
        size = len(data)
        start, status = 0, 200
        if request.range:
            m = _RANGE.match(request.range.strip())
            if not m or int(m.group(1)) >= size:
                request.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            data, status = data[start:end + 1], 206
        request.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{size}")
        self.end_headers()
        if head:
            return
        stall = self.stub._stall
        if stall is not None and stall.file_path == file_path and status == 200:
            self.stub._stall = None
            self.wfile.write(data[:stall.after_bytes])
            self.wfile.flush()
            request.body_bytes = stall.after_bytes
            stall.reached.set()
            stall.release.wait(timeout=60)
            self.close_connection = True
            return
        self.wfile.write(data)
        request.body_bytes = len(data)


def _listing(files: dict[str, bytes]) -> list[dict]:
    """The repo/files entries: one blob per file, one tree per directory, as ModelScope lists them."""
    dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
    entries = [{"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Revision": COMMIT}
               for d in dirs]
    for path, data in files.items():
        entries.append({"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob", "Size": len(data),
                        "Sha256": hashlib.sha256(data).hexdigest(), "Revision": COMMIT, "IsLFS": len(data) > 100_000})
    return entries
