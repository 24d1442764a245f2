"""A loopback HTTP server for the demo web: pages and images, plus the failures a downloader meets.

It serves whatever is in `site_dir` at request time, so it can start (and fix the port that
goes into every generated URL) before the site is written. Per-path behaviour comes from a
rules file the generator writes next to the pages (`site_dir/.demo-server.json`):
  - `content_types`: exact Content-Type per path (pages declare their charset here, or not);
  - `redirects`: path -> target path, answered with 302;
  - `slow_paths`: answered with 200 and a full Content-Length, then one byte a second, up to
    `drip_cap_s` seconds, then the connection is closed: a downloader needs a total deadline;
  - bad bytes need no rule: they are files whose bytes are not an image, served as image/jpeg
    by their extension; 404 is any path with no file.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import posixpath
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from laion_spark.demo.web import DemoWeb

log = logging.getLogger(__name__)

RULES_FILE = ".demo-server.json"
SERVER_HEADER = "laion-spark-demo/1.0"
_EXTRA_TYPES = {".webp": "image/webp", ".svg": "image/svg+xml", ".jpeg": "image/jpeg", ".jpg": "image/jpeg",
                ".htm": "text/html", ".html": "text/html", ".css": "text/css", ".txt": "text/plain"}


@dataclass
class ServerRules:
    """Per-path behaviour, reloaded when the rules file changes."""

    content_types: dict[str, str] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    slow_paths: frozenset[str] = frozenset()

    @classmethod
    def load(cls, path: Path) -> "ServerRules":
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(dict(data.get("content_types", {})), dict(data.get("redirects", {})),
                   frozenset(data.get("slow_paths", ())))


def guess_content_type(path: str) -> str:
    suffix = posixpath.splitext(path)[1].lower()
    return _EXTRA_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


class _DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a dripping or idle keep-alive connection must not block shutdown
    allow_reuse_address = True

    def __init__(self, site_dir: Path, drip_cap_s: float, drip_interval_s: float) -> None:
        self.site_dir = site_dir
        self.drip_cap_s = drip_cap_s
        self.drip_interval_s = drip_interval_s
        self.stopping = threading.Event()
        self._rules = ServerRules()
        self._rules_mtime: float | None = None
        self._rules_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _DemoRequestHandler)

    def rules(self) -> ServerRules:
        rules_path = self.site_dir / RULES_FILE
        try:
            mtime = rules_path.stat().st_mtime_ns
        except FileNotFoundError:
            return ServerRules()
        with self._rules_lock:
            if mtime != self._rules_mtime:
                try:
                    self._rules = ServerRules.load(rules_path)
                    self._rules_mtime = mtime
                except (OSError, ValueError) as exc:  # half-written by the generator: retry next time
                    log.debug("rules file %s not readable yet: %s", rules_path, exc)
            return self._rules


class _DemoRequestHandler(BaseHTTPRequestHandler):
    server: _DemoHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = SERVER_HEADER
    sys_version = ""
    timeout = 30  # idle keep-alive connections end on their own

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def _respond(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path) or "/"
        rules = self.server.rules()
        if path in rules.redirects:
            self._send_simple(HTTPStatus.FOUND, b"", "text/plain", send_body, location=rules.redirects[path])
            return
        file_path = self._file_for(path)
        if path in rules.slow_paths:
            body = file_path.read_bytes() if file_path is not None else b"\xff" * 4096
            self._drip(body, rules.content_types.get(path) or guess_content_type(path), send_body)
            return
        if file_path is None:
            self._send_simple(HTTPStatus.NOT_FOUND, b"<html><body><h1>404 Not Found</h1></body></html>\n",
                              "text/html", send_body)
            return
        body = file_path.read_bytes()
        content_type = rules.content_types.get(path) or guess_content_type(file_path.name)
        self._send_simple(HTTPStatus.OK, body, content_type, send_body)

    def _file_for(self, path: str) -> Path | None:
        """The file under site_dir for a URL path; None for dot files, traversal and directories
        without index.html."""
        parts = [p for p in path.split("/") if p]
        if any(p.startswith(".") for p in parts):
            return None
        candidate = self.server.site_dir.joinpath(*parts) if parts else self.server.site_dir
        if candidate.is_dir():
            candidate = candidate / "index.html"
        return candidate if candidate.is_file() else None

    def _send_simple(self, status: HTTPStatus, body: bytes, content_type: str, send_body: bool,
                     location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if location is not None:
            self.send_header("Location", location)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _drip(self, body: bytes, content_type: str, send_body: bool) -> None:
        """Announce the whole body, then send one byte per interval until the cap, then hang up."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        if not send_body:
            return
        self.wfile.flush()
        max_bytes = min(len(body) - 1, int(self.server.drip_cap_s / self.server.drip_interval_s))
        try:
            for i in range(max(0, max_bytes)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                if self.server.stopping.wait(self.server.drip_interval_s):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, which is the point


class DemoWebServer:
    """The demo web on http://127.0.0.1:<free port>; a context manager, or start()/stop()."""

    def __init__(self, site_dir: Path | str, drip_cap_s: float = 30.0, drip_interval_s: float = 1.0) -> None:
        self.site_dir = Path(site_dir)
        self.drip_cap_s = min(float(drip_cap_s), 30.0)
        self.drip_interval_s = drip_interval_s
        self._httpd: _DemoHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("DemoWebServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "DemoWebServer":
        if self._httpd is not None:
            return self
        self.site_dir.mkdir(parents=True, exist_ok=True)
        self._httpd = _DemoHTTPServer(self.site_dir, self.drip_cap_s, self.drip_interval_s)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"demo-web-{self.port}", daemon=True)
        self._thread.start()
        log.info("demo web server serving %s on %s", self.site_dir, self.base_url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.stopping.set()  # dripping handlers stop within one interval
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("demo web server on port %s stopped", self._httpd.server_address[1])
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "DemoWebServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def serve_demo_web(out_dir: Path | str, seed: int = 0, n_pages: int = 240, n_warc_files: int = 4,
                   drip_cap_s: float = 30.0) -> Iterator[tuple[DemoWebServer, "DemoWeb"]]:
    """Start a server on out_dir/site, generate the demo web for its base URL, yield both."""
    from laion_spark.demo.web import generate_demo_web

    out_dir = Path(out_dir)
    with DemoWebServer(out_dir / "site", drip_cap_s=drip_cap_s) as server:
        web = generate_demo_web(out_dir, server.base_url, seed=seed, n_pages=n_pages, n_warc_files=n_warc_files)
        yield server, web
