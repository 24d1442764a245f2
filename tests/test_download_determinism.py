"""Deterministic rows: the same tiny download twice gives the same `images.error` strings, and no
error holds a per-run value (a memory address like `<_io.BytesIO object at 0x7f...>`)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download_server import MisbehavingServer  # noqa: E402

from laion_spark.config import DownloadConfig  # noqa: E402
from laion_spark.download.downloader import IMAGES_SCHEMA, download_batches  # noqa: E402

PATHS = ["/ok-1", "/html-as-jpeg", "/truncated", "/404", "/500", "/tiny", "/bomb", "/loop-a",
         "/redirect-private", "/gif"]
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}|object at ")


def _errors(base: str) -> dict[str, str | None]:
    cfg = DownloadConfig(allow_loopback=True, total_deadline_s=5.0, read_timeout_s=3.0,
                         connect_timeout_s=3.0, threads_per_task=4, per_host_concurrency=4)
    urls = [base + p for p in PATHS]
    batch = pa.RecordBatch.from_pydict({
        "uid": list(range(len(urls))), "url": urls, "text": [f"alt {i}" for i in range(len(urls))],
        "language": ["en"] * len(urls), "language_group": ["en"] * len(urls), "shard": [0] * len(urls)})
    out = pa.Table.from_batches(list(download_batches([batch], cfg)), schema=IMAGES_SCHEMA)
    assert out.num_rows == len(urls)
    return {r["url"][len(base):]: r["error"] for r in out.to_pylist()}


def test_same_download_twice_gives_identical_errors():
    server = MisbehavingServer().start()
    try:
        first, second = _errors(server.base), _errors(server.base)
    finally:
        server.stop()
    assert first["/ok-1"] is None and first["/html-as-jpeg"]  # the case that held an address
    with_address = {p: e for p, e in first.items() if e and ADDRESS.search(e)}
    assert not with_address, f"errors hold per-run values: {with_address}"
    assert first == second
