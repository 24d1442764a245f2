"""The downloader against a loopback server that misbehaves in every way the open web does.

No Spark here: `download_batches` is plain Python over Arrow batches."""
from __future__ import annotations

import io
import ipaddress
import socket
import sys
import threading
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

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
    "/truncated": ("failed", "bad_bytes", 200),
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
    assert elapsed < 2 * DEADLINE + 2.0, elapsed
    # The endless body is capped at max_bytes: nothing near unbounded was held in memory.
    assert peak < 60_000_000, peak
    assert _download_threads() == [], "no downloader thread is left behind"


def test_private_redirect_targets_are_refused_before_any_connection(server, monkeypatch):
    connected: list[tuple] = []
    real = safety.u3_connection.create_connection

    def recording(address, *args, **kwargs):
        connected.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(safety.u3_connection, "create_connection", recording)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail(f"unpinned connect {a}"))
    rows = _run([server.base + "/redirect-private", server.base + "/redirect-metadata",
                 "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/x"], _cfg())
    assert {error_code(r["error"]) for r in rows.values()} == {"blocked_address"}
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
