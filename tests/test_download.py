"""The downloader against a loopback server that misbehaves in every way the open web does.

No Spark here: `download_batches` is plain Python over Arrow batches."""
from __future__ import annotations

import hashlib
import io
import ipaddress
import re
import socket
import sys
import threading
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download_server import MisbehavingServer, make_jpeg  # noqa: E402

from laion_spark.config import DownloadConfig  # noqa: E402
from laion_spark.download import safety  # noqa: E402
from laion_spark.download.downloader import IMAGES_SCHEMA, download_batches, error_code  # noqa: E402
from laion_spark.download.fetch import Fetcher, parse_retry_after, robots_refusal  # noqa: E402
from laion_spark.download.resize import process_image  # noqa: E402
from laion_spark.download.safety import AddressPolicy  # noqa: E402

DEADLINE = 3.0


@pytest.fixture()
def server():
    srv = MisbehavingServer().start()
    yield srv
    srv.stop()


def _cfg(**kw) -> DownloadConfig:
    base = dict(allow_loopback=True, total_deadline_s=DEADLINE, read_timeout_s=2.0, connect_timeout_s=2.0,
                threads_per_task=12, max_bytes=2_000_000, per_host_concurrency=16)
    base.update(kw)
    return DownloadConfig(**base)


def _run(urls: list[str], cfg: DownloadConfig) -> dict[str, dict]:
    batch = pa.RecordBatch.from_pydict({
        "uid": list(range(len(urls))), "url": urls, "text": [f"alt {i}" for i in range(len(urls))],
        "language": ["en"] * len(urls), "language_group": ["en"] * len(urls), "shard": [7] * len(urls)})
    out = pa.Table.from_batches(list(download_batches([batch], cfg, batch_rows=5)), schema=IMAGES_SCHEMA)
    assert out.num_rows == len(urls), "every candidate gives exactly one row"
    assert sorted(out.column("uid").to_pylist()) == list(range(len(urls)))
    return {r["url"]: r for r in out.to_pylist()}


def _download_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("download-")]


MISBEHAVING = {
    # path: (status, error code, http status)
    "/ok": ("success", None, 200),
    "/404": ("failed", "http_404", 404),
    "/500": ("failed", "http_500", 500),
    "/endless": ("failed", "too_large", 200),
    "/drip": ("failed", "timeout", 200),
    "/stall-headers": ("failed", "timeout", None),
    "/loop-a": ("failed", "too_many_redirects", None),
    "/redirect-ok": ("success", None, 200),
    "/redirect-private": ("skipped", "blocked_address", None),
    "/redirect-metadata": ("skipped", "blocked_address", None),
    "/bomb": ("failed", "too_many_pixels", 200),
    "/html-as-jpeg": ("failed", "bad_bytes", 200),
    "/truncated": ("failed", "truncated", 200),
    "/noai": ("skipped", "robots_disallowed", 200),
    "/robots-other-bot": ("success", None, 200),
    "/429-always": ("failed", "http_429", 429),
    "/tiny": ("failed", "too_small", 200),
    "/gif": ("failed", "unsupported_format", 200),
    "/huge": ("failed", "too_large", 200),
}


def test_every_misbehaviour_ends_in_its_row_within_the_deadline(server):
    urls = [server.base + p for p in MISBEHAVING]
    tracemalloc.start()
    started = time.monotonic()
    rows = _run(urls, _cfg(threads_per_task=len(urls)))  # all start at once: each gets its own deadline
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for path, (status, code, http_status) in MISBEHAVING.items():
        row = rows[server.base + path]
        assert (row["status"], error_code(row["error"])) == (status, code), (path, row["error"])
        if http_status is not None:
            assert row["http_status"] == http_status, path
        if status == "success":
            assert row["image"] and row["width"] == 256 and row["height"] == 256
            assert Image.open(io.BytesIO(row["image"])).format == "JPEG"
            assert row["image_bytes_sha256"] and row["shard"] == 7
        else:
            assert row["image"] is None and row["width"] is None
    # The drip (hours at 1 byte/s) and the stalled headers are cut by the total deadline, not by
    # the read timeout; the margin covers a loaded 2-core CI machine and tracemalloc's overhead.
    assert elapsed < 4 * DEADLINE + 4.0, elapsed
    # The endless body is capped at max_bytes: nothing near unbounded was held in memory.
    assert peak < 60_000_000, peak
    assert _download_threads() == [], "no downloader thread is left behind"


def _record_connections(monkeypatch) -> list:
    """Every address the pinned connections open (and no unpinned connection at all)."""
    connected: list = []
    real = safety.u3_connection.create_connection

    def recording(address, *args, **kwargs):
        connected.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(safety.u3_connection, "create_connection", recording)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail(f"unpinned connect {a}"))
    return connected


def test_private_redirect_targets_are_refused_before_any_connection(server, monkeypatch):
    connected = _record_connections(monkeypatch)
    urls = [server.base + "/redirect-private", server.base + "/redirect-metadata",
            "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/x"]
    # The same targets in the IPv6 forms that embed an IPv4 address, directly and on the 2nd/3rd hop
    # of a redirect chain whose earlier hops are fine.
    for target in ("[2002:a9fe:a9fe::]", "[2001:0:4136:e378:8000:63bf:5601:5601]", "[64:ff9b::a9fe:a9fe]",
                   "[::a9fe:a9fe]", "[2002:a00:1::]", "[fec0::1]", "[64:ff9b:1::a00:1]"):
        urls.append(f"http://{target}/latest/meta-data/")
        urls.append(server.base + "/redirect-to/2/" + quote(f"http://{target}/latest/meta-data/", safe=""))
    urls.append(server.base + "/redirect-to/3/" + quote("http://169.254.169.254/", safe=""))
    ok_after = server.base + "/ok-after-the-refusals"
    rows = _run(urls + [ok_after], _cfg(threads_per_task=2))
    assert rows.pop(ok_after)["status"] == "success"  # the refusals leave the fetcher working
    assert {(r["status"], error_code(r["error"])) for r in rows.values()} == {("skipped", "blocked_address")}, \
        {u: r["error"] for u, r in rows.items() if error_code(r["error"]) != "blocked_address"}
    assert "6to4 form of a link-local" in rows["http://[2002:a9fe:a9fe::]/latest/meta-data/"]["error"]
    assert "site-local" in rows["http://[fec0::1]/latest/meta-data/"]["error"]
    hosts = {addr[0] for addr in connected}
    assert hosts == {"127.0.0.1"}, connected  # only the loopback test server, never 10.x / 169.254.x


def test_loopback_is_refused_by_default(server):
    rows = _run([server.base + "/ok"], _cfg(allow_loopback=False))
    row = rows[server.base + "/ok"]
    assert row["status"] == "skipped" and error_code(row["error"]) == "blocked_address"
    assert server.hits == {}


def test_connection_is_pinned_to_the_checked_address(server, monkeypatch):
    """A name that resolves to a public address first and a private one later (DNS rebinding)
    is contacted on the first, checked answer only; the Host header keeps the name."""
    port = server.httpd.server_address[1]
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "rebind.example":
            ips = next(answers)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    fetcher = Fetcher(_cfg())
    try:
        result = fetcher.fetch(f"http://rebind.example:{port}/ok")
    finally:
        fetcher.close()
    assert result.ok, result.error
    assert server.host_headers == [f"rebind.example:{port}"]


def test_adapter_refuses_a_request_without_a_checked_address():
    import requests

    session = requests.Session()
    session.mount("http://", safety.PinnedAddressAdapter(AddressPolicy(allow_loopback=True)))
    with pytest.raises(safety.BlockedAddressError):
        session.get("http://127.0.0.1:9/never")


@pytest.mark.parametrize("address,allowed", [
    ("93.184.216.34", True), ("2606:2800:220:1::1", True), ("127.0.0.1", False), ("::1", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("fe80::1", False), ("224.0.0.1", False), ("240.0.0.1", False), ("0.0.0.0", False),
    ("100.64.0.1", False), ("::ffff:127.0.0.1", False), ("fd00::1", False),
    # IPv6 forms that embed an IPv4 address get the embedded address's verdict
    ("2002:a9fe:a9fe::1", False), ("2002:808:808::1", True),  # 6to4
    ("2001:0:4136:e378:8000:63bf:5601:5601", False), ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),  # Teredo
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::808:808", True), ("64:ff9b:1::808:808", False),  # NAT64
    ("::a00:1", False), ("fec0::1", False), ("fec0:1::1", False),  # IPv4-compatible, site-local
])
def test_address_policy(address, allowed):
    assert (AddressPolicy().refusal(ipaddress.ip_address(address)) is None) == allowed
    if address in ("127.0.0.1", "::1"):
        assert AddressPolicy(allow_loopback=True).refusal(ipaddress.ip_address(address)) is None


def test_429_with_retry_after_is_honoured_then_retried(server):
    started = time.monotonic()
    rows = _run([server.base + "/429"], _cfg(retries=1, total_deadline_s=5.0))
    row = rows[server.base + "/429"]
    assert row["status"] == "success", row["error"]
    assert time.monotonic() - started >= 1.0  # waited Retry-After: 1
    assert server.hits["/429"] == 2


def test_429_without_retries_fails_fast_and_backs_off_the_host(server):
    fetcher = Fetcher(_cfg(retries=0))
    try:
        first = fetcher.fetch(server.base + "/429-always")
        started = time.monotonic()
        second = fetcher.fetch(server.base + "/ok")  # same host: waits out Retry-After
        waited = time.monotonic() - started
    finally:
        fetcher.close()
    assert error_code(first.error) == "http_429" and first.http_status == 429
    assert second.ok and waited >= 0.8


def test_transient_errors_are_retried_only_when_asked(server):
    rows = _run([server.base + "/flaky-a"], _cfg(retries=0))
    assert error_code(rows[server.base + "/flaky-a"]["error"]) == "http_500"
    rows = _run([server.base + "/flaky-b"], _cfg(retries=2))
    assert rows[server.base + "/flaky-b"]["status"] == "success"
    rows = _run([server.base + "/404"], _cfg(retries=3))
    assert server.hits["/404"] == 1  # a 404 is not transient


def test_per_host_concurrency_is_capped(server):
    urls = [server.base + f"/slow-ok-{i}" for i in range(12)]
    rows = _run(urls, _cfg(per_host_concurrency=3, threads_per_task=12, total_deadline_s=10.0))
    assert all(r["status"] == "success" for r in rows.values())
    assert server.max_concurrent <= 3


def test_robots_header_switch_and_scoping(server):
    rows = _run([server.base + "/noai"], _cfg(respect_robots_headers=False))
    assert rows[server.base + "/noai"]["status"] == "success"
    assert robots_refusal(["noimageindex"], "laion-spark", ["noimageindex"]) == "noimageindex"
    assert robots_refusal(["googlebot: noai"], "laion-spark", ["noai"]) is None
    assert robots_refusal(["laion-spark: noai, noindex"], "laion-spark", ["noindex"]) == "noindex"
    assert robots_refusal(["unavailable_after: 25 Jun 2010 15:00:00 PST"], "laion-spark", ["noai"]) is None
    assert robots_refusal(["index, follow"], "laion-spark", ["noai"]) is None


def test_retry_after_parsing():
    assert parse_retry_after("3", 1.0) == 3.0
    assert parse_retry_after("garbage", 1.0) == 1.0
    assert parse_retry_after(None, 2.0) == 2.0
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1.0) <= 1.0


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode,size", [
    ("no", (640, 480)), ("keep_ratio", (341, 256)), ("keep_ratio_largest", (256, 192)),
    ("center_crop", (256, 256)), ("border", (256, 256)),
])
def test_resize_modes(mode, size):
    result = process_image(make_jpeg(640, 480), DownloadConfig(resize_mode=mode))
    assert result.error is None
    assert (result.width, result.height) == size
    assert (result.original_width, result.original_height) == (640, 480)
    assert Image.open(io.BytesIO(result.image)).size == size


def test_border_pads_with_white_and_webp_output():
    result = process_image(make_jpeg(640, 320), DownloadConfig(resize_mode="border", output_format="webp",
                                                                image_size=128))
    img = Image.open(io.BytesIO(result.image))
    assert img.format == "WEBP" and img.size == (128, 128) and result.image_format == "webp"
    assert min(img.convert("RGB").getpixel((64, 2))) > 240  # top band is padding


def test_exif_orientation_is_applied():
    result = process_image(make_jpeg(400, 200, exif_orientation=6), DownloadConfig(resize_mode="no"))
    assert (result.original_width, result.original_height) == (200, 400)
    assert (result.width, result.height) == (200, 400)


def test_pixel_cap_is_checked_from_the_header():
    from download_server import png_bomb

    # 10,000 x 9,000 = 90,000,000 px: over LAION's 89,478,484 but under Pillow's own error bound.
    result = process_image(png_bomb(10_000, 9_000), DownloadConfig())
    assert error_code(result.error) == "too_many_pixels"
    assert "10000x9000" in result.error


def test_resize_only_if_bigger_keeps_small_images():
    result = process_image(make_jpeg(200, 150), DownloadConfig(resize_mode="keep_ratio", resize_only_if_bigger=True))
    assert (result.width, result.height) == (200, 150)


# --------------------------------------------------------------------------- issue 12: protocol cases
HOSTILE_HTTP = {
    # path: (status, error code, http status)
    "/early-hints": ("success", None, 200),
    "/endless-1xx": ("failed", "bad_response", None),
    "/gzip": ("success", None, 200),
    "/gzip-bomb": ("failed", "too_large", 200),
    "/gzip-corrupt": ("failed", "bad_encoding", 200),
    "/brotli": ("failed", "unsupported_encoding", 200),
    "/length-superscript": ("failed", "bad_response", 200),
    "/length-negative": ("failed", "bad_response", 200),
    "/length-conflict": ("failed", "bad_response", None),  # refused by urllib3 before a response
    "/short-body": ("failed", "truncated", 200),
    "/redirect-bad-ipv6": ("failed", "bad_url", None),
    "/lying-jpeg": ("failed", "truncated", 200),
    "/many-scans": ("failed", "too_many_scans", 200),
    "/png-9000": ("failed", "too_large", 200),
}


def test_protocol_oddities_give_clean_codes_and_the_next_url_still_downloads(server):
    from download_server import solid_png

    server.png_9000 = solid_png(9000, 9000, 4)  # made before the clock starts (a loaded box takes seconds)
    urls = []
    for i, path in enumerate(HOSTILE_HTTP):
        urls += [server.base + path, server.base + f"/ok-after-{i}"]  # same host, right after
    urls += ["http://[::1/", "http://[::1/x.jpg"]
    rows = _run(urls, _cfg(threads_per_task=4))
    for path, (status, code, http_status) in HOSTILE_HTTP.items():
        row = rows[server.base + path]
        assert (row["status"], error_code(row["error"])) == (status, code), (path, row["error"])
        assert row["http_status"] == http_status, path
    for i in range(len(HOSTILE_HTTP)):
        assert rows[server.base + f"/ok-after-{i}"]["status"] == "success"
    # The gzip-encoded image is the image: its hash is the one of the decoded bytes.
    assert rows[server.base + "/gzip"]["image_bytes_sha256"] == hashlib.sha256(server.jpeg).hexdigest()
    assert error_code(rows["http://[::1/"]["error"]) == "bad_url"


def test_user_agent_and_accept_are_sent_on_every_request_and_hop(server):
    cfg = _cfg(user_agent="laion-spark-test/9 (+https://example.org/opt-out)")
    rows = _run([server.base + "/ok", server.base + "/redirect-ok", server.base + "/early-hints"], cfg)
    assert all(r["status"] == "success" for r in rows.values())
    assert {p for p, _, _ in server.requests} == {"/ok", "/redirect-ok", "/ok-after-redirect", "/early-hints"}
    for path, agent, accept in server.requests:
        assert agent == cfg.user_agent, (path, agent)
        assert "image/*" in accept, (path, accept)



def test_no_cookie_is_kept_between_requests(server):
    fetcher = Fetcher(_cfg())
    try:
        assert fetcher.fetch(server.base + "/set-cookie").ok
        assert fetcher.fetch(server.base + "/ok").ok
    finally:
        fetcher.close()
    assert server.cookies == [None, None]


@pytest.mark.parametrize("url,code", [
    ("http://[::1/", "bad_url"), ("http://[::1", "bad_url"), ("http://a.test:99999/x", "bad_url"),
    ("http://a.test:-1/x", "bad_url"), ("http:///x.jpg", "bad_url"), ("http://", "bad_url"),
    ("http://a b.test/x", "bad_url"), ("http://a\x00b.test/", "bad_url"), ("javascript:alert(1)", "unsupported_scheme"),
    ("ftp://a.test/x.jpg", "unsupported_scheme"), ("//a.test/x.jpg", "unsupported_scheme"),
    ("http://" + "a" * 300 + ".test/", "bad_url"), ("http://xn--/x", "dns_error"),
    ("http://\u2603.test/x", "dns_error"), ("http://%zz.test/", "dns_error"), ("http://[fe80::1%25eth0]/", "blocked_address"),
])
def test_hostile_urls_get_stable_codes(url, code, monkeypatch):
    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    fetcher = Fetcher(_cfg())
    try:
        result = fetcher.fetch(url)
    finally:
        fetcher.close()
    assert error_code(result.error) == code, result.error
    assert result.error == result.error.encode("utf-8", "replace").decode("utf-8")  # no lone surrogate


def _fake_dns(monkeypatch, port: int, answers: dict, gate: threading.Event):
    """getaddrinfo answering from `answers` (host -> ip, or an exception); "slow.test" waits on gate."""
    calls: list[str] = []
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if not host.endswith(".test"):
            return real(host, *args, **kwargs)  # the connection itself (to 127.0.0.1)
        calls.append(host)
        if host == "slow.test":
            gate.wait(30)
        answer = answers.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return calls


def test_dns_is_under_the_total_deadline(server, monkeypatch):
    port = server.httpd.server_address[1]
    gate = threading.Event()
    calls = _fake_dns(monkeypatch, port, {"slow.test": "127.0.0.1", "fine.test": "127.0.0.1"}, gate)
    try:
        started = time.monotonic()
        rows = _run([f"http://slow.test:{port}/ok", f"http://slow.test:{port}/ok-2",
                     f"http://fine.test:{port}/ok"], _cfg(total_deadline_s=2.0))
        elapsed = time.monotonic() - started
    finally:
        gate.set()
    assert error_code(rows[f"http://slow.test:{port}/ok"]["error"]) == "timeout"
    assert "DNS" in rows[f"http://slow.test:{port}/ok"]["error"]
    assert error_code(rows[f"http://slow.test:{port}/ok-2"]["error"]) == "timeout"
    assert rows[f"http://fine.test:{port}/ok"]["status"] == "success"
    assert calls.count("slow.test") == 1  # both URLs waited on one lookup
    assert elapsed < 15, elapsed  # the resolver would have held them 30 s


def test_dns_failures_are_cached_per_task(server, monkeypatch):
    port = server.httpd.server_address[1]
    calls = _fake_dns(monkeypatch, port, {"fine.test": "127.0.0.1"}, threading.Event())
    urls = [f"http://nx.test:{port}/ok-{i}" for i in range(8)] + [f"http://fine.test:{port}/ok"]
    rows = _run(urls, _cfg(threads_per_task=1))
    assert [error_code(rows[u]["error"]) for u in urls[:8]] == ["dns_error"] * 8
    assert rows[urls[8]]["status"] == "success", rows[urls[8]]["error"]
    assert calls.count("nx.test") == 1
    assert rows[urls[0]]["error"] == "dns_error: nx.test: EAI_NONAME"
    calls.clear()
    _run(urls[:2], _cfg(threads_per_task=1, dns_negative_ttl_s=0.0))
    assert calls.count("nx.test") == 2  # the cache is per task and its TTL is configurable


def test_same_input_gives_identical_rows(server):
    """No error detail may hold a memory address or other per-run value."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    paths = ["/ok", "/404", "/html-as-jpeg", "/truncated", "/bomb", "/gif", "/tiny", "/noai", "/drip",
             "/length-superscript", "/gzip-corrupt", "/brotli", "/redirect-private", "/loop-a", "/short-body"]
    urls = [server.base + p for p in paths] + [f"http://127.0.0.1:{dead_port}/x.jpg", "http://[::1/"]
    first = _run(urls, _cfg(threads_per_task=len(urls)))
    second = _run(urls, _cfg(threads_per_task=len(urls)))
    for url in urls:
        a, b = dict(first[url]), dict(second[url])
        a.pop("downloaded_at"), b.pop("downloaded_at")
        assert a == b, url
        assert a["error"] is None or " at 0x" not in a["error"], a["error"]
        assert a["error"] is None or re.fullmatch(r"[a-z][a-z0-9_]*: \S.*", a["error"]), a["error"]
    assert "<_io.BytesIO>" in first[server.base + "/html-as-jpeg"]["error"] or \
        "cannot identify" in first[server.base + "/html-as-jpeg"]["error"]
    assert error_code(first[f"http://127.0.0.1:{dead_port}/x.jpg"]["error"]) == "connection_error"


# --------------------------------------------------------------------------- issue 12: decode limits
def test_jpeg_header_claiming_more_than_its_data_is_truncated():
    from download_server import lying_jpeg

    result = process_image(lying_jpeg(9000), DownloadConfig())
    assert error_code(result.error) == "truncated", result.error
    honest = process_image(make_jpeg(640, 480), DownloadConfig())
    assert honest.error is None


def test_scan_count_is_capped_before_decoding():
    from download_server import many_scan_jpeg

    assert process_image(many_scan_jpeg(512, 20), DownloadConfig(min_image_bytes=0)).error is None  # 30 scans
    result = process_image(many_scan_jpeg(512, 200), DownloadConfig(max_jpeg_scans=100, min_image_bytes=0))
    assert error_code(result.error) == "too_many_scans", result.error


def test_decode_deadline_interrupts_a_slow_progressive_jpeg():
    """90 near-empty scans over 3000 x 3000: under the scan cap, slow to decode; the deadline cuts
    it between scans. Measured here, not assumed: the uninterrupted decode is timed first."""
    from download_server import many_scan_jpeg

    data = many_scan_jpeg(3000, 80)
    started = time.monotonic()
    full = process_image(data, DownloadConfig(decode_deadline_s=600))
    full_s = time.monotonic() - started
    assert full.error is None
    deadline = min(0.3, full_s / 4)
    started = time.monotonic()
    cut = process_image(data, DownloadConfig(decode_deadline_s=deadline))
    cut_s = time.monotonic() - started
    assert error_code(cut.error) == "timeout", cut.error
    assert cut_s < full_s, (cut_s, full_s)


def test_decode_deadline_covers_png_too():
    """PNG keeps EXIF after its pixels, so even reading the orientation decodes: under the deadline."""
    from download_server import solid_png

    data = solid_png(4000, 4000, 3)
    started = time.monotonic()
    result = process_image(data, DownloadConfig(decode_deadline_s=0.05))
    assert error_code(result.error) == "timeout", result.error
    assert time.monotonic() - started < 5
    assert process_image(data, DownloadConfig()).error is None


_MEMORY_PROBE = """
import sys
sys.path.insert(0, {tests!r})
from download_server import peak_rss, solid_png
from laion_spark.config import DownloadConfig
from laion_spark.download.resize import process_image
data = solid_png({size}, {size}, 4)
process_image(solid_png(64, 64, 4), DownloadConfig(min_image_bytes=0))  # imports and plugins loaded
base = peak_rss()
result = process_image(data, DownloadConfig())
print(str(result.error).split(":")[0], peak_rss() - base)
"""


@pytest.mark.parametrize("size", [9000, 5000])
def test_decode_memory_is_bounded(size):
    """A 9000 x 9000 RGBA PNG (324 MB as pixels; the old path peaked at ~1 GB) is refused before
    decoding; a 5000 x 5000 one decodes within its estimate (the raster plus one working copy)."""
    import subprocess

    code = _MEMORY_PROBE.format(tests=str(Path(__file__).resolve().parent), size=size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr
    error, peak = out.stdout.split()[-2], int(out.stdout.split()[-1])
    raster = size * size * 4
    if size == 9000:
        assert error == "too_large", out.stdout
        assert peak < 20_000_000, peak
    else:
        assert error == "None", out.stdout
        assert raster < peak < 1.15 * 2 * raster, (peak, raster)  # the raster itself was really measured
