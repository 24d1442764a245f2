"""A loopback HTTP server that misbehaves in every way the downloader must survive (tests only)."""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class MisbehavingServer:
    """Routes (path -> behaviour); counts hits per path; stops its dripping handlers on stop()."""

    def __init__(self) -> None:
        self.jpeg = make_jpeg()
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.concurrent = 0
        self.max_concurrent = 0
        self.host_headers: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    n = server.hits[path]
                    server.host_headers.append(self.headers.get("Host", ""))
                try:
                    server.route(self, path, n)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # clients hanging up on a drip is the point

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

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
            self.send(h, 200, make_gif(), "image/gif")
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
            self.send(h, 200, make_jpeg(8, 8, quality=30))
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
        elif path == "/429-always":
            self.send(h, 429, b"slow down", "text/plain", {"Retry-After": "1"})
        else:
            self.send(h, 404, b"no route", "text/plain")
