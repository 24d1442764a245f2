"""A loopback HTTP server that misbehaves in every way the downloader must survive (tests only)."""
from __future__ import annotations

import gzip
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image


def make_jpeg(w: int = 640, h: int = 480, seed: int = 0, quality: int = 90, exif_orientation: int | None = None) -> bytes:
    """A noisy JPEG (so it is well over 5,000 bytes)."""
    import random

    rng = random.Random(seed)
    img = Image.effect_noise((w, h), 60).convert("RGB")
    img = Image.blend(img, Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), 90)), 0.5)
    out = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(out, "JPEG", quality=quality, exif=exif)
    else:
        img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_png_rgba(w: int = 300, h: int = 200) -> bytes:
    img = Image.effect_noise((w, h), 80).convert("RGBA")
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def make_gif(w: int = 300, h: int = 200) -> bytes:
    img = Image.effect_noise((w, h), 80).convert("P")
    out = io.BytesIO()
    img.save(out, "GIF")
    return out.getvalue()


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG header declaring w x h pixels with a tiny (never decodable in full) body,
    padded to pass the 5,000-byte minimum."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (3 * 1000)
    idat = zlib.compress(row * 2000, 9)  # a few KB that inflate to MBs: the start of the bomb
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def solid_png(w: int, h: int, mode_bytes: int = 3) -> bytes:
    """A valid w x h PNG (RGB, or RGBA with mode_bytes=4) of one colour, made by streaming zlib:
    a 9000 x 9000 one is ~240 KB and never exists as pixels on this side."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color_type = {3: 2, 4: 6}[mode_bytes]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    row = b"\x00" + bytes([90, 140, 200, 255][:mode_bytes]) * w
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def lying_jpeg(claimed: int = 9000) -> bytes:
    """A real 64 x 64 JPEG whose frame header claims claimed x claimed pixels (padded past 5,000 bytes)."""
    data = bytearray(make_jpeg(64, 64, quality=95))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", claimed, claimed)
    return bytes(data[:2]) + b"\xff\xfe" + struct.pack(">H", 5002) + b"\0" * 5000 + bytes(data[2:])


def many_scan_jpeg(size: int, extra_scans: int) -> bytes:
    """A progressive JPEG of one grey (so each AC scan is a few dozen bytes of end-of-band runs)
    with its last scan repeated `extra_scans` times: each repeat still walks every block."""
    import re

    img = Image.new("RGB", (size, size), (128, 128, 128))
    out = io.BytesIO()
    img.save(out, "JPEG", progressive=True, quality=90)
    data = out.getvalue()
    sos = data.rfind(b"\xff\xda")
    dht = data.rfind(b"\xff\xc4", 0, sos)
    start = dht if dht > data.rfind(b"\xff\xda", 0, sos) else sos
    header_end = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, header_end).start()
    return data[:end] + data[start:end] * extra_scans + data[end:]


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over from the parent at fork and exec, so a probe started by a pytest
    holding more than the probe will ever use measures nothing (a delta of 0 passes any bound)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up (on a drip, at a deadline) is the point


def _loopback_server(handle) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """An HTTP/1.1 server on 127.0.0.1 (port chosen by the OS) whose GETs all go to handle(handler)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            handle(self)

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    return httpd, threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


class MisbehavingServer:
    """Routes (path -> behaviour); counts hits per path; stops its dripping handlers on stop()."""

    def __init__(self) -> None:
        self.jpeg = make_jpeg()
        # made once: the same URL gives the same bytes (row determinism tests)
        self.gif, self.tiny = make_gif(), make_jpeg(8, 8, quality=30)
        self.png_9000 = None
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.concurrent = 0
        self.max_concurrent = 0
        self.host_headers: list[str] = []
        self.requests: list[tuple[str, str, str]] = []  # (path, User-Agent, Accept) of every request
        self.cookies: list = []  # the Cookie header of every request (None when absent)
        self.httpd, self.thread = _loopback_server(self.handle)

    def handle(self, h) -> None:
        path = h.path.split("?", 1)[0]
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            n = self.hits[path]
            self.host_headers.append(h.headers.get("Host", ""))
            self.requests.append((path, h.headers.get("User-Agent", ""), h.headers.get("Accept", "")))
            self.cookies.append(h.headers.get("Cookie"))
        try:
            self.route(h, path, n)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "MisbehavingServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ behaviours
    @staticmethod
    def send(h, status: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def route(self, h, path: str, n: int) -> None:
        if path.startswith("/ok"):
            self.send(h, 200, self.jpeg)
        elif path == "/png-rgba":
            self.send(h, 200, make_png_rgba(), "image/png")
        elif path == "/gif":
            self.send(h, 200, self.gif, "image/gif")
        elif path == "/rotated":
            self.send(h, 200, make_jpeg(400, 200, exif_orientation=6))
        elif path == "/404":
            self.send(h, 404, b"not here", "text/plain")
        elif path == "/500":
            self.send(h, 500, b"oops", "text/plain")
        elif path == "/endless":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()  # no length: a body that never ends
            h.close_connection = True
            block = b"\xff" * 65536
            while not self.stopping.is_set():
                h.wfile.write(block)
        elif path == "/drip":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(self.jpeg)))
            h.end_headers()
            h.close_connection = True
            for i in range(len(self.jpeg)):
                h.wfile.write(self.jpeg[i:i + 1])
                h.wfile.flush()
                if self.stopping.wait(1.0):
                    break
        elif path == "/stall-headers":
            h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            h.wfile.flush()
            h.close_connection = True
            while not self.stopping.wait(0.5):
                h.wfile.write(b"X")  # one header byte every half second, forever
                h.wfile.flush()
        elif path.startswith("/loop"):
            self.send(h, 302, b"", "text/plain", {"Location": "/loop-b" if path == "/loop-a" else "/loop-a"})
        elif path == "/set-cookie":
            self.send(h, 200, self.jpeg, headers={"Set-Cookie": "track=1; Path=/"})
        elif path == "/redirect-ok":
            self.send(h, 302, b"", "text/plain", {"Location": "/ok-after-redirect"})
        elif path == "/redirect-private":
            self.send(h, 302, b"", "text/plain", {"Location": "http://10.0.0.1/x"})
        elif path == "/redirect-metadata":
            self.send(h, 302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/bomb":
            self.send(h, 200, png_bomb(), "image/png")
        elif path == "/html-as-jpeg":
            body = b"<!DOCTYPE html><html><body>" + b"<p>Hotlinking forbidden</p>" * 300 + b"</body></html>"
            self.send(h, 200, body, "image/jpeg")
        elif path == "/truncated":
            self.send(h, 200, self.jpeg[: len(self.jpeg) // 2])
        elif path == "/noai":
            self.send(h, 200, self.jpeg, headers={"X-Robots-Tag": "noai, noimageai"})
        elif path == "/robots-other-bot":
            self.send(h, 200, self.jpeg, headers={"X-Robots-Tag": "otherbot: noai"})
        elif path == "/tiny":
            self.send(h, 200, self.tiny)
        elif path == "/huge":
            self.send(h, 200, b"\xff\xd8" + b"\x00" * 3_000_000)
        elif path == "/429":
            if n == 1:
                self.send(h, 429, b"slow down", "text/plain", {"Retry-After": "1"})
            else:
                self.send(h, 200, self.jpeg)
        elif path.startswith("/slow-ok"):
            with self.lock:
                self.concurrent += 1
                self.max_concurrent = max(self.max_concurrent, self.concurrent)
            try:
                time.sleep(0.3)
            finally:
                with self.lock:
                    self.concurrent -= 1
            self.send(h, 200, self.jpeg)
        elif path.startswith("/flaky"):
            if n == 1:
                self.send(h, 500, b"try again later", "text/plain")
            else:
                self.send(h, 200, self.jpeg)
        elif path == "/early-hints":  # 103 Early Hints, then the real answer on the same connection
            h.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            h.wfile.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            self.send(h, 200, self.jpeg)
        elif path == "/endless-1xx":
            h.close_connection = True
            for _ in range(1000):
                h.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        elif path == "/gzip":  # gzip-encoded although we asked for identity; Content-Length is compressed
            self.send(h, 200, gzip.compress(self.jpeg), headers={"Content-Encoding": "gzip"})
        elif path == "/gzip-bomb":  # 3 MB of zeros in ~3 KB, over the 2 MB cap once inflated
            self.send(h, 200, gzip.compress(b"\0" * 3_000_000, 9), headers={"Content-Encoding": "gzip"})
        elif path == "/gzip-corrupt":
            body = gzip.compress(self.jpeg)
            self.send(h, 200, body[:20] + b"\xff" * 64 + body[84:], headers={"Content-Encoding": "gzip"})
        elif path == "/brotli":
            self.send(h, 200, self.jpeg, headers={"Content-Encoding": "br"})
        elif path in ("/length-superscript", "/length-negative", "/length-conflict"):
            value = {"/length-superscript": "\u00b2", "/length-negative": "-5",
                     "/length-conflict": f"{len(self.jpeg)}, 7"}[path]
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", value)  # "²" goes out as latin-1 byte 0xB2
            h.end_headers()
            h.close_connection = True
            h.wfile.write(self.jpeg)
        elif path == "/short-body":  # promises more than it sends, then hangs up
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(self.jpeg) + 1000))
            h.end_headers()
            h.close_connection = True
            h.wfile.write(self.jpeg)
        elif path.startswith("/redirect-to/"):  # /redirect-to/<hop count>/<url-quoted target>
            _, _, hops, target = path.split("/", 3)
            location = f"/redirect-to/{int(hops) - 1}/{target}" if int(hops) > 1 else unquote(target)
            self.send(h, 302, b"", "text/plain", {"Location": location})
        elif path == "/redirect-bad-ipv6":
            self.send(h, 302, b"", "text/plain", {"Location": "http://[::1/x"})
        elif path == "/lying-jpeg":
            self.send(h, 200, lying_jpeg(9000))
        elif path == "/many-scans":
            self.send(h, 200, many_scan_jpeg(1000, 300))
        elif path == "/png-9000":
            if self.png_9000 is None:
                self.png_9000 = solid_png(9000, 9000, 4)
            self.send(h, 200, self.png_9000, "image/png")
        elif path == "/429-always":
            self.send(h, 429, b"slow down", "text/plain", {"Retry-After": "1"})
        else:
            self.send(h, 404, b"no route", "text/plain")


# --------------------------------------------------------------------------- archive replay
def replay_key(url: str) -> tuple[str, str]:
    """(host, path?query) with percent-escapes undone, so a URL as written in a page, as requests
    sends it and as the archive recorded it all meet."""
    parts = urlsplit(url)
    target = unquote(parts.path or "/") + ("?" + unquote(parts.query) if parts.query else "")
    return (parts.hostname or "").lower(), target


class ReplayServer:
    """Serves a web archive's HTTP responses under their original URLs on 127.0.0.1: the host is
    taken from the Host header (the downloader is told `connect_to = {"*": this server}`), the
    status, headers (Location, Content-Type...) and payload as recorded."""

    def __init__(self, warc_path: str) -> None:
        from warcio.archiveiterator import ArchiveIterator

        self.records: dict[tuple[str, str], tuple[int, str, list, bytes]] = {}
        with open(warc_path, "rb") as f:
            for rec in ArchiveIterator(f):
                if rec.rec_type != "response" or rec.http_headers is None:
                    continue
                url = rec.rec_headers.get_header("WARC-Target-URI")
                status = int(rec.http_headers.get_statuscode())
                body = rec.content_stream().read()  # de-chunked and decoded: the payload as a client sees it
                headers = [(k, v) for k, v in rec.http_headers.headers
                           if k.lower() not in ("content-length", "transfer-encoding", "content-encoding",
                                                "connection", "keep-alive")]
                self.records.setdefault(replay_key(url), (status, url, headers, body))
        self.hits = 0
        self.httpd, self.thread = _loopback_server(self.handle)

    def handle(self, h) -> None:
        self.hits += 1
        host = h.headers.get("Host", "")
        host = host if host.endswith("]") else host.rsplit(":", 1)[0]
        rec = self.records.get((host.lower(), replay_key("http://x" + h.path)[1]))
        if rec is None:
            MisbehavingServer.send(h, 404, b"not in the archive", "text/plain")
            return
        status, _, headers, body = rec
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def resolve(self, url: str, max_hops: int = 5) -> Optional[tuple[int, bytes, str]]:
        """(status, payload, content type) the archive ends at for `url`, following its redirects."""
        for _ in range(max_hops + 1):
            rec = self.records.get(replay_key(url))
            if rec is None:
                return None
            status, original, headers, body = rec
            header = {k.lower(): v for k, v in headers}
            if status in (301, 302, 303, 307, 308) and "location" in header:
                url = urljoin(original, header["location"])
                continue
            return status, body, header.get("content-type", "")
        return None

    def start(self) -> "ReplayServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
