"""The downloader attacked again as a hostile server and a hostile URL list would, with cases
tests/test_download.py does not have: every spelling of a refused address, a connection made
only after the deadline fired, a dripping TLS handshake, and images whose decode costs more than
their header suggests (WebP), or that Pillow names differently (MPO), or that lose their tones
(16-bit grey). Servers listen on 127.0.0.1 only; no other address is ever contacted."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from download_server import MisbehavingServer, make_jpeg  # noqa: E402
from test_download import _cfg, _download_threads, _record_connections, _run  # noqa: E402

from laion_spark.config import DownloadConfig  # noqa: E402
from laion_spark.download import safety  # noqa: E402
from laion_spark.download.downloader import error_code  # noqa: E402
from laion_spark.download.resize import process_image  # noqa: E402


@pytest.fixture()
def server():
    srv = MisbehavingServer().start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- SSRF spellings
LOOPBACK_SPELLINGS = [
    "2130706433", "0177.0.0.1", "0x7f000001", "0x7f.1", "127.1", "017700000001", "0", "localhost",
    "[::ffff:7f00:1]", "[::ffff:127.0.0.1]", "[::]", "[::1]", "[::ffff:127.0.0.1%25lo]",
    "good.test@127.0.0.1", "u:p@0x7f.0.0.1",
]
METADATA_SPELLINGS = [
    "2852039166", "0251.0376.0251.0376", "0xa9.0xfe.0xa9.0xfe", "0xa9fea9fe", "169.254.43518",
    "[::ffff:a9fe:a9fe]", "[::ffff:169.254.169.254]", "[fe80::a9fe:a9fe%25eth0]", "good.test@169.254.169.254",
]


def test_every_spelling_of_loopback_is_refused_before_connecting(server, monkeypatch):
    """Decimal, octal, hex and short IPv4, IPv4-mapped IPv6 (with a zone id), the unspecified
    address (Linux delivers 0.0.0.0 to the local host), /etc/hosts names and userinfo tricks,
    all aimed at the live test server's port: none may reach it when loopback is not allowed."""
    connected = _record_connections(monkeypatch)
    port = server.httpd.server_address[1]
    urls = [f"http://{host}:{port}/ok" for host in LOOPBACK_SPELLINGS]
    rows = _run(urls, _cfg(allow_loopback=False, threads_per_task=4))
    wrong = {u: r["error"] for u, r in rows.items() if (r["status"], error_code(r["error"])) != ("skipped", "blocked_address")}
    assert wrong == {}
    assert server.hits == {} and connected == []


def test_every_spelling_of_the_metadata_address_is_refused_on_every_hop(server, monkeypatch):
    connected = _record_connections(monkeypatch)
    urls = []
    for host in METADATA_SPELLINGS:
        urls.append(f"http://{host}/latest/meta-data/")
        urls.append(server.base + "/redirect-to/2/" + quote(f"http://{host}/latest/meta-data/", safe=""))
    # Schemes a redirect may name that are not ours to follow, and a 60 KB Location.
    for target in ("file:///etc/passwd", "data:image/jpeg;base64,/9j/4AAQ", "ftp://127.0.0.1/x.jpg",
                   "gopher://127.0.0.1:70/x"):
        urls.append(server.base + "/redirect-to/1/" + quote(target, safe=""))
    long_target = "/ok-long?" + "a" * 60_000
    urls.append(server.base + "/redirect-to/1/" + quote(long_target, safe=""))
    ok_after = server.base + "/ok-after"
    rows = _run(urls + [ok_after], _cfg(threads_per_task=4))
    assert rows.pop(ok_after)["status"] == "success"
    assert rows.pop(urls[-1])["status"] == "success"  # a long Location is only long
    codes = {u: (r["status"], error_code(r["error"])) for u, r in rows.items()}
    for url, code in codes.items():
        expected = "unsupported_scheme" if "redirect-to/1/" in url else "blocked_address"
        assert code == ("skipped", expected), (url, rows[url]["error"])
    assert {addr[0] for addr in connected} == {"127.0.0.1"}, connected


# --------------------------------------------------------------------------- deadline gaps
def test_deadline_cuts_a_connection_that_opened_after_it(server, monkeypatch):
    """A server that answers the TCP handshake only as the deadline fires (a slow network, or a
    SYN-ACK timed on purpose), then drips: the watchdog found no socket to shut at the deadline,
    and the per-read timeout never trips on a drip, so the request must still end near the
    deadline instead of hours later."""
    deadline = 1.0
    real = safety.u3_connection.create_connection

    def late(address, *args, **kwargs):
        time.sleep(deadline + 0.5)  # the connection exists only after the watchdog fired
        return real(address, *args, **kwargs)

    monkeypatch.setattr(safety.u3_connection, "create_connection", late)
    results: dict = {}

    def fetch(path):
        results[path] = _run([server.base + path], _cfg(total_deadline_s=deadline))[server.base + path]

    threads = [threading.Thread(target=fetch, args=(p,), daemon=True) for p in ("/drip", "/stall-headers")]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline + 8)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), f"a request outlived its {deadline}s deadline by {elapsed:.0f}s"
    for path in ("/drip", "/stall-headers"):
        assert error_code(results[path]["error"]) == "timeout", (path, results[path]["error"])
    monkeypatch.setattr(safety.u3_connection, "create_connection", real)
    assert _run([server.base + "/ok"], _cfg())[server.base + "/ok"]["status"] == "success"
    assert _download_threads() == []


def test_a_dripping_tls_handshake_ends_at_the_deadline():
    """The TLS handshake reads under the connect timeout, which restarts on every byte: a server
    sending its handshake one byte at a time is cut by the total deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def drip(conn):
        with conn:
            try:
                conn.recv(4096)  # the ClientHello
                conn.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KB handshake record follows...
                while not stop.wait(0.2):
                    conn.sendall(b"\x02")  # ...one byte at a time
            except OSError:
                pass

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/x.jpg"
    try:
        started = time.monotonic()
        row = _run([url], _cfg(total_deadline_s=1.5, connect_timeout_s=1.0, read_timeout_s=1.0))[url]
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        listener.close()
    assert error_code(row["error"]) == "timeout", row["error"]
    assert elapsed < 1.5 + 4, elapsed


# --------------------------------------------------------------------------- images
def test_mpo_is_decoded_as_the_jpeg_it_starts_with():
    """Phones and stereo cameras store JPEGs with extra pictures (MPF: a gain map, a depth map, a
    second eye); Pillow calls them MPO. The first picture is a plain JPEG any browser shows."""
    first = Image.open(io.BytesIO(make_jpeg(640, 480, seed=1)))
    second = Image.open(io.BytesIO(make_jpeg(320, 240, seed=2)))
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(out.getvalue())).format == "MPO"
    result = process_image(out.getvalue(), DownloadConfig(resize_mode="keep_ratio"))
    assert result.error is None, result.error
    assert (result.original_width, result.original_height, result.width, result.height) == (640, 480, 341, 256)
    # The JPEG-only checks still run on it: a lying frame header is still truncated.
    from download_server import lying_jpeg

    lying = Image.open(io.BytesIO(lying_jpeg(9000)))
    out = io.BytesIO()
    Image.open(io.BytesIO(make_jpeg(64, 64))).save(out, "MPO", save_all=True, append_images=[lying.copy()])
    data = bytearray(out.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") * 2
    assert error_code(process_image(bytes(data), DownloadConfig(min_image_bytes=0)).error) == "truncated"
    # Unless JPEG itself is not allowed.
    assert error_code(process_image(out.getvalue(), DownloadConfig(allowed_formats=["PNG"], min_image_bytes=0)).error) \
        == "unsupported_format"


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_16_bit_grey_png_keeps_its_tones(byteorder):
    """A 16-bit greyscale PNG (scans, medical and scientific images) is mode I;16 in Pillow, whose
    conversion to 8 bits clips at 255: everything above 1/256 of full scale came out white."""
    ramp = np.linspace(0, 65535, 300 * 200).reshape(200, 300).astype(byteorder + "u2")
    img = Image.fromarray(ramp.astype("<u2"))
    if byteorder == ">":
        img = Image.frombytes("I;16B", img.size, ramp.tobytes())
    out = io.BytesIO()
    img.save(out, "PNG")
    assert Image.open(io.BytesIO(out.getvalue())).mode.startswith("I;16")
    result = process_image(out.getvalue(), DownloadConfig(min_image_bytes=0, resize_mode="no"))
    assert result.error is None, result.error
    grey = np.asarray(Image.open(io.BytesIO(result.image)).convert("L")).astype(float)
    expected = (ramp.astype(float) / 257).round()
    assert abs(grey.mean() - expected.mean()) < 3, (grey.mean(), expected.mean())
    assert np.abs(grey - expected).mean() < 3


_WEBP_PROBE = """
import io, sys
from PIL import Image
from laion_spark.config import DownloadConfig
from laion_spark.download.resize import process_image, decode_bytes_estimate
data = open(sys.argv[1], "rb").read()
small = io.BytesIO()
Image.new("RGB", (64, 64)).save(small, "WEBP", lossless=True)
process_image(small.getvalue(), DownloadConfig(min_image_bytes=0))  # imports and plugins loaded
img = Image.open(io.BytesIO(data))
estimate = decode_bytes_estimate(img, img.size, None)
img.close()
sys.path.insert(0, sys.argv[3])
from download_server import peak_rss
base = peak_rss()
result = process_image(data, DownloadConfig(min_image_bytes=0, max_decode_bytes=int(sys.argv[2])))
print(str(result.error).split(":")[0], estimate, peak_rss() - base)
"""


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_webp_decode_memory_is_within_its_estimate(tmp_path, mode):
    """libwebp decodes through its animation decoder, which keeps two full RGBA canvases, and
    Pillow copies the frame out: ~16 bytes a pixel, not Pillow's 4. A 3000 x 3000 WebP of a few
    hundred bytes is measured against the estimate in a fresh process, then refused under a
    max_decode_bytes the old 4-bytes-a-pixel estimate let through."""
    size = 3000
    path = tmp_path / "big.webp"
    Image.new(mode, (size, size), (90, 140, 200, 128)[:len(mode)]).save(path, "WEBP", lossless=True)
    assert path.stat().st_size < 5000

    def probe(max_decode_bytes: int) -> tuple[str, int, int]:
        out = subprocess.run([sys.executable, "-c", _WEBP_PROBE, str(path), str(max_decode_bytes), str(TESTS)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        error, estimate, peak = out.stdout.split()[-3:]
        return error, int(estimate), int(peak)

    error, estimate, peak = probe(10 ** 10)
    assert error == "None"
    assert peak <= 1.05 * estimate, (peak, estimate)
    error, _, peak = probe(size * size * 8)  # twice Pillow's raster: the old estimate passed it
    assert error == "too_large", error
    assert peak < 20_000_000, peak


def _not_allowed_formats(n: int) -> dict:
    """Bodies in formats we refuse whose Pillow plugins parse for seconds before a format check
    could run (8 MB: EPS 6.1 s, PPM 3.9 s, IM 1.5 s, ICNS 0.8 s measured before the fix)."""
    import struct

    return {
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n" + b"%%a\n" * (n // 4),
        "ppm": b"P6\n#" + b"a" * n,
        "icns": b"icns" + struct.pack(">I", n + 8) + (b"ic07" + struct.pack(">I", 8)) * (n // 8),
        "im": b"Image type: RGB image\r\n" + b"Lut: x\r\n" * (n // 8),
    }


def test_formats_we_refuse_are_never_parsed(monkeypatch):
    """Only the allowed formats' Pillow plugins see a body; another format is named from its first
    bytes and refused at once. Pillow's EPS plugin would start Ghostscript on load: never reached."""
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript started"))
    cfg = DownloadConfig(decode_deadline_s=30)
    for name, data in _not_allowed_formats(8_000_000).items():
        started = time.monotonic()
        result = process_image(data, cfg)
        elapsed = time.monotonic() - started
        expected = "bad_bytes" if name == "im" else "unsupported_format"  # IM has no header test: unnamed
        assert error_code(result.error) == expected, (name, result.error)
        assert elapsed < 0.5, (name, elapsed)
    assert process_image(_not_allowed_formats(8_000)["eps"], cfg).error == "unsupported_format: EPS"
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">' + b"<g/>" * 2000 + b"</svg>"
    assert error_code(process_image(svg, cfg).error) == "unsupported_format"
    # Allowed formats still open, and a broken one of them is bad bytes, not a refused format.
    png = io.BytesIO()
    Image.effect_noise((200, 200), 80).convert("RGB").save(png, "PNG")
    assert process_image(png.getvalue(), DownloadConfig(min_image_bytes=0)).error is None
    broken = png.getvalue()[:16] + b"\0" * 8000
    assert error_code(process_image(broken, DownloadConfig(min_image_bytes=0)).error) == "bad_bytes"
    gif = io.BytesIO()
    Image.effect_noise((200, 200), 80).convert("P").save(gif, "GIF")
    assert process_image(gif.getvalue(), DownloadConfig(min_image_bytes=0)).error == "unsupported_format: GIF"
    assert process_image(gif.getvalue(), DownloadConfig(min_image_bytes=0, allowed_formats=["GIF"])).error is None
    # A name Pillow does not know in allowed_formats is ignored, not an error for every image.
    assert process_image(png.getvalue(), DownloadConfig(min_image_bytes=0, allowed_formats=["PNG", "JPG"])).error is None


def test_jpeg_marker_walk_is_under_the_decode_deadline():
    """Our own walk over a JPEG's markers (for the scan count and the lying-header check) ran in
    Python before the decode deadline started: 19 MB of fill bytes, of empty APP segments or of
    RST markers took 1.5 s each idle, 7-12 s on a loaded box, before Pillow's (deadline-bound)
    parse even began; 12 MB took 0.9-1.3 s against a 0.2 s deadline."""
    n = 12_000_000
    deadline = 0.2
    for name, data in {"fill": b"\xff\xd8" + b"\xff" * n, "segments": b"\xff\xd8" + b"\xff\xe1\x00\x02" * (n // 4),
                       "restarts": b"\xff\xd8" + b"\xff\xd0" * (n // 2)}.items():
        started = time.monotonic()
        result = process_image(data, DownloadConfig(decode_deadline_s=deadline))
        elapsed = time.monotonic() - started
        assert error_code(result.error) == "timeout", (name, result.error)
        assert elapsed < deadline + 0.5, (name, elapsed)
    assert process_image(make_jpeg(640, 480), DownloadConfig(decode_deadline_s=deadline)).error is None


def test_lookups_nobody_waits_for_are_dropped(server, monkeypatch):
    """Dead domains whose name servers never answer are common in old URL lists. A lookup whose
    requests all gave up at their deadline used to stay queued and run later anyway, so names
    queued behind a burst of such lookups waited for all of them (4 lookup threads) and their URLs
    timed out too. Here 12 lame names take 1.5 s each; the good name after them must still resolve."""
    port = server.httpd.server_address[1]
    calls: list = []
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if not host.endswith(".test"):
            return real(host, *args, **kwargs)
        calls.append(host)
        if host.startswith("lame-"):
            time.sleep(1.5)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    lame = [f"http://lame-{i}.test:{port}/ok" for i in range(12)]
    good = [f"http://good.test:{port}/ok-{i}" for i in range(3)]
    rows = _run(lame + good, _cfg(total_deadline_s=1.0, threads_per_task=12))
    assert [error_code(rows[u]["error"]) for u in lame] == ["timeout"] * 12
    assert [rows[u]["status"] for u in good] == ["success"] * 3, [rows[u]["error"] for u in good]
    assert sum(c.startswith("lame-") for c in calls) == 4  # the 8 queued ones never ran


def test_a_backslash_in_the_authority_is_refused(server, monkeypatch):
    """`http://169.254.169.254\\@good.test/`: urlsplit takes good.test as the host (the rest is
    userinfo), while urllib3 and browsers (WHATWG) end the host at the backslash: 169.254.169.254.
    The connection was pinned to good.test's checked address, so it never left it, but the
    request sent there named another host than the one checked. Refused before any lookup."""
    port = server.httpd.server_address[1]
    connected = _record_connections(monkeypatch)
    looked_up: list = []
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host.endswith(".test"):
            looked_up.append(host)
        if host == "good.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    bad = [f"http://169.254.169.254\\@good.test:{port}/ok", f"http://10.0.0.1:80\\@good.test:{port}/ok",
           server.base + "/redirect-to/1/" + quote(f"http://169.254.169.254\\@good.test:{port}/ok", safe="")]
    ok = f"http://good.test:{port}/ok"
    rows = _run(bad + [ok], _cfg(threads_per_task=2))
    for url in bad:
        assert error_code(rows[url]["error"]) == "bad_url", (url, rows[url]["error"])
    assert rows[ok]["status"] == "success"
    assert looked_up == ["good.test"] and {a[0] for a in connected} == {"127.0.0.1"}
    assert server.host_headers.count(f"good.test:{port}") == 1 and len(server.host_headers) == 2  # ok + the redirect


def test_serve_query_images_open_only_web_raster_formats(monkeypatch):
    """A query's image_url (or upload) went through every Pillow plugin with no deadline: 8 MB of
    EPS comment lines parsed for seconds, and an EPS that parses is then loaded, which starts
    Ghostscript on the sender's PostScript where it is installed."""
    from PIL import EpsImagePlugin

    from laion_spark.serve.encoders import QueryError, decode_query_image

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript started"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n%%EOF\n"
    for data in (eps, _not_allowed_formats(8_000_000)["eps"]):
        started = time.monotonic()
        with pytest.raises(QueryError) as refused:
            decode_query_image(data, 10 ** 7)
        assert refused.value.code == "bad_image"
        assert time.monotonic() - started < 0.5
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, fmt)
        assert decode_query_image(buf.getvalue(), 10 ** 6).size == (40, 30), fmt


def test_a_trailing_dot_is_the_same_host_for_politeness(server, monkeypatch):
    """`good.test.` is `good.test` (the absolute spelling of the name): its requests count
    against the same per-host cap and share its 429 back-off. Each spelling had its own slots,
    so a URL list could double (or, with more spellings, multiply) the load on one host."""
    port = server.httpd.server_address[1]
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host.rstrip(".") == "good.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    urls = [f"http://good.test{'.' * (i % 2)}:{port}/slow-ok-{i}" for i in range(6)]
    rows = _run(urls, _cfg(per_host_concurrency=1, threads_per_task=6, total_deadline_s=10.0))
    assert all(r["status"] == "success" for r in rows.values()), {u: r["error"] for u, r in rows.items()}
    assert server.max_concurrent == 1
