"""One shard (or any stream of candidate rows): Arrow batches in, `images` Arrow batches out.

Inside: a pool of `threads_per_task` fetch threads (network-bound) and a small pool of
`decode_workers` threads for Pillow (which releases the GIL while decoding, resizing and
encoding). At most `max_in_flight` rows are between "submitted" and "written to an output
batch", so memory stays bounded by max_in_flight x max_bytes whatever the shard size, and
results leave as Arrow batches of `batch_rows` rows: never a whole shard of images in memory.
"""
from __future__ import annotations

import datetime as dt
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import pyarrow as pa

from laion_spark.config import DownloadConfig
from laion_spark.download.fetch import Fetcher, FetchResult
from laion_spark.download.resize import ImageResult, check_config, process_image
from laion_spark.download.safety import clean_detail

log = logging.getLogger(__name__)

IMAGES_SCHEMA = pa.schema([
    ("uid", pa.int64()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("language", pa.string()),
    ("language_group", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("http_status", pa.int32()),
    ("image", pa.binary()),
    ("image_format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("image_bytes_sha256", pa.string()),
    ("downloaded_at", pa.timestamp("us", tz="UTC")),
    ("shard", pa.int32()),
])

INPUT_COLUMNS = ("uid", "url", "text", "language", "language_group", "shard")
BATCH_ROWS = 256


@dataclass
class _Row:
    uid: int
    url: str
    text: Optional[str]
    language: Optional[str]
    language_group: Optional[str]
    shard: Optional[int]


@dataclass
class ShardStats:
    """Counts of one call, logged at the end (the Spark job sums the table instead)."""

    rows: int = 0
    success: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict = field(default_factory=dict)


def error_code(error: Optional[str]) -> Optional[str]:
    """`"http_404: Not Found"` -> `"http_404"`: the stable part of an error."""
    return None if error is None else error.split(":", 1)[0]


class _Builder:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in IMAGES_SCHEMA}

    def __len__(self) -> int:
        return len(self.cols["uid"])

    def add(self, row: _Row, status: str, error: Optional[str], fetch: Optional[FetchResult],
            image: Optional[ImageResult]) -> None:
        c = self.cols
        c["uid"].append(row.uid)
        c["url"].append(row.url)
        c["text"].append(row.text)
        c["language"].append(row.language)
        c["language_group"].append(row.language_group)
        c["status"].append(status)
        c["error"].append(error)
        c["http_status"].append(fetch.http_status if fetch else None)
        ok = status == "success" and image is not None
        c["image"].append(image.image if ok else None)
        c["image_format"].append(image.image_format if ok else None)
        c["width"].append(image.width if ok else None)
        c["height"].append(image.height if ok else None)
        c["original_width"].append(image.original_width if image else None)
        c["original_height"].append(image.original_height if image else None)
        c["image_bytes_sha256"].append(image.sha256 if image else None)
        c["downloaded_at"].append(dt.datetime.now(dt.timezone.utc))
        c["shard"].append(row.shard)

    def flush(self) -> pa.RecordBatch:
        batch = pa.RecordBatch.from_pydict(self.cols, schema=IMAGES_SCHEMA)
        self.cols = {f.name: [] for f in IMAGES_SCHEMA}
        return batch


def _rows(batches: Iterable[pa.RecordBatch]) -> Iterator[_Row]:
    for batch in batches:
        names = set(batch.schema.names)
        cols = {n: (batch.column(n).to_pylist() if n in names else [None] * batch.num_rows)
                for n in INPUT_COLUMNS}
        for i in range(batch.num_rows):
            yield _Row(cols["uid"][i], cols["url"][i], cols["text"][i], cols["language"][i],
                       cols["language_group"][i], cols["shard"][i])


def download_batches(batches: Iterable[pa.RecordBatch], cfg: DownloadConfig,
                     batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Every input row gives exactly one output row (success, failed or skipped)."""
    check_config(cfg)
    threads = max(1, cfg.threads_per_task)
    max_in_flight = threads + 2 * max(1, cfg.decode_workers)
    fetcher = Fetcher(cfg)
    fetch_pool = ThreadPoolExecutor(threads, thread_name_prefix="download-fetch")
    decode_pool = ThreadPoolExecutor(max(1, cfg.decode_workers), thread_name_prefix="download-decode")
    done: "queue.Queue[tuple]" = queue.Queue()
    stats = ShardStats()
    started = time.monotonic()

    def decode(row: _Row, fetched: FetchResult) -> None:
        try:
            image = process_image(fetched.body or b"", cfg)
            fetched.body = None
            done.put((row, fetched, image, None))
        except BaseException as exc:  # never lose a row
            done.put((row, fetched, None, exc))

    def fetch(row: _Row) -> None:
        try:
            if not row.url:
                done.put((row, FetchResult(row.url or "", error="bad_url: empty"), None, None))
                return
            fetched = fetcher.fetch(row.url)
            if fetched.ok:
                decode_pool.submit(decode, row, fetched)
            else:
                done.put((row, fetched, None, None))
        except BaseException as exc:
            done.put((row, None, None, exc))

    builder = _Builder()
    in_flight = 0

    def take_one(block: bool) -> bool:
        nonlocal in_flight
        try:
            row, fetched, image, exc = done.get(block=block)
        except queue.Empty:
            return False
        in_flight -= 1
        if exc is not None:
            log.exception("download of %s failed inside the downloader", row.url, exc_info=exc)
            status, error = "failed", f"internal_error: {clean_detail(f'{type(exc).__name__}: {exc}')}"
        elif fetched is not None and fetched.error is not None:
            status, error = ("skipped" if fetched.skipped else "failed"), fetched.error
        elif image is not None and image.error is not None:
            status, error = "failed", image.error
        else:
            status, error = "success", None
        builder.add(row, status, error, fetched, image)
        stats.rows += 1
        if status == "success":
            stats.success += 1
        else:
            setattr(stats, status, getattr(stats, status) + 1)
            code = error_code(error) or "?"
            stats.errors[code] = stats.errors.get(code, 0) + 1
        return True

    try:
        for row in _rows(batches):
            while in_flight >= max_in_flight:
                take_one(block=True)
                if len(builder) >= batch_rows:
                    yield builder.flush()
            while take_one(block=False):
                pass
            if len(builder) >= batch_rows:
                yield builder.flush()
            fetch_pool.submit(fetch, row)
            in_flight += 1
        while in_flight > 0:
            take_one(block=True)
            if len(builder) >= batch_rows:
                yield builder.flush()
        if len(builder):
            yield builder.flush()
    finally:
        fetch_pool.shutdown(wait=True, cancel_futures=True)
        decode_pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()
        elapsed = time.monotonic() - started
        log.info("downloaded %d rows in %.1fs (%.1f rows/s): %d success, %d failed, %d skipped; %s",
                 stats.rows, elapsed, stats.rows / max(elapsed, 1e-9), stats.success, stats.failed,
                 stats.skipped, stats.errors)
