"""One input file → Arrow record batches of candidates, failures and the file's counts.

Plain Python (no Spark): `extract_file_batches(path, cfg)` is what each Spark task runs through
`mapInArrow`, and what the tests and the benchmark call directly. Rows of three kinds share one
schema (a `kind` column) so one pass over the file yields everything; the job splits them.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa

from laion_spark.config import ExtractConfig
from laion_spark.extract.html import charset_from_content_type, decode_html, extract_images
from laion_spark.extract.records import ReadFailure, RawRecord, iter_records
from laion_spark.extract.rules import CandidateRules, LanguageIdentifier, resolve_base, uid_of

try:  # orjson is ~3x faster on WAT payloads; json is the fallback
    import orjson as _json

    _loads = _json.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger(__name__)

KIND_CANDIDATE = "candidate"
KIND_FAILURE = "failure"
KIND_FILE = "file"

CANDIDATE_COLUMNS = [
    "uid", "url", "text", "title", "page_url", "language", "language_prob", "language_group",
    "source_file", "source_format", "record_offset", "url_source", "crawl", "fetch_time",
]
FAILURE_COLUMNS = ["source_file", "record_offset", "error", "crawl", "failed_at"]
FILE_COLUMNS = [
    "source_file", "crawl", "n_bytes", "n_records", "n_html_pages", "n_images", "n_with_alt",
    "n_kept", "n_failures", "drops", "seconds", "extracted_at",
]

TS = pa.timestamp("us", tz="UTC")
OUTPUT_SCHEMA = pa.schema([
    ("kind", pa.string()),
    ("uid", pa.int64()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("title", pa.string()),
    ("page_url", pa.string()),
    ("language", pa.string()),
    ("language_prob", pa.float64()),
    ("language_group", pa.string()),
    ("source_file", pa.string()),
    ("source_format", pa.string()),
    ("record_offset", pa.int64()),
    ("url_source", pa.string()),
    ("crawl", pa.string()),
    ("fetch_time", TS),
    ("error", pa.string()),
    ("failed_at", TS),
    ("n_bytes", pa.int64()),
    ("n_records", pa.int64()),
    ("n_html_pages", pa.int64()),
    ("n_images", pa.int64()),
    ("n_with_alt", pa.int64()),
    ("n_kept", pa.int64()),
    ("n_failures", pa.int64()),
    ("drops", pa.string()),
    ("seconds", pa.float64()),
    ("extracted_at", TS),
])

_CRAWL_RE = re.compile(r"CC-MAIN-\d{4}-\d{2}(?!\d)")


def crawl_of(path: str, configured: str = "") -> str:
    """The crawl id: configured, else `CC-MAIN-YYYY-WW` from the path, else ''."""
    if configured:
        return configured
    m = _CRAWL_RE.search(path)
    return m.group(0) if m else ""


def parse_warc_date(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    try:
        d = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def _first(value: Any) -> Any:
    """WAT JSON since December 2024 gives repeated headers as lists; older files as strings."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


# ------------------------------------------------------------------------------- HTTP
@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def split_http_response(block: bytes) -> Optional[tuple[int, dict[str, str], int]]:
    """(status, lower-cased headers, body start) of an HTTP response block, or None if it is not one."""
    end = block.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end = block.find(b"\n\n")
        sep = 2
        if end < 0:
            return None
    head = block[:end].decode("latin-1")
    lines = head.replace("\r\n", "\n").split("\n")
    status_line = lines[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].upper().startswith("HTTP/"):
        return None
    try:
        status = int(status_line[1])
    except ValueError:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return status, headers, end + sep


def _dechunk(body: bytes) -> bytes:
    out, i = [], 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        if j < 0:
            break
        try:
            size = int(body[i:j].split(b";")[0].strip(), 16)
        except ValueError:
            return body  # not really chunked: keep as is
        if size == 0:
            break
        out.append(body[j + 2:j + 2 + size])
        i = j + 2 + size + 2
    return b"".join(out)


def decode_http_body(headers: dict[str, str], body: bytes) -> bytes:
    """Undo chunked transfer and gzip/deflate content encoding where the crawler kept them."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    encoding = headers.get("content-encoding", "").lower().strip()
    if encoding in ("gzip", "x-gzip", "deflate") and body[:2] in (b"\x1f\x8b", b"\x78\x9c", b"\x78\x01", b"\x78\xda"):
        try:
            return zlib.decompress(body, 47 if body[:2] == b"\x1f\x8b" else 15)
        except zlib.error:
            try:
                return zlib.decompressobj(-15).decompress(body)
            except zlib.error:
                return body
    return body


def _is_http_record(rec: RawRecord) -> bool:
    """An HTTP exchange (not a `dns:` lookup or an FTP response, which Heritrix also writes)."""
    ct = (rec.content_type or "").lower()
    if ct:
        return "application/http" in ct
    uri = (rec.target_uri or "").lower()
    return uri.startswith(("http:", "https:"))


def _looks_like_html(content_type: Optional[str], body_head: bytes) -> bool:
    if content_type:
        ct = content_type.lower()
        return "html" in ct
    start = body_head[:512].lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html")) or b"<html" in start


# ------------------------------------------------------------------------------- per file
@dataclass
class FileCounts:
    """What one input file gave, for `extract_files` and the log."""

    n_bytes: int = 0
    n_records: int = 0
    n_html_pages: int = 0
    n_images: int = 0
    n_with_alt: int = 0
    n_kept: int = 0
    n_failures: int = 0
    drops: Counter = field(default_factory=Counter)


# Column order of candidate rows as `FileExtractor._candidates` appends them.
_CANDIDATE_FIELDS = ["uid", "url", "text", "title", "page_url", "language", "language_prob",
                     "language_group", "source_file", "source_format", "record_offset",
                     "url_source", "crawl", "fetch_time"]


class _BatchBuilder:
    """Columnar buffers: candidates go straight into per-column lists (no dict per row, the hot
    path); the rare failure and file rows are kept as dicts. Flushes as OUTPUT_SCHEMA batches."""

    def __init__(self, batch_rows: int):
        self.batch_rows = batch_rows
        self.columns: list[list] = [[] for _ in _CANDIDATE_FIELDS]
        self.other_rows: list[dict] = []

    @property
    def n(self) -> int:
        return len(self.columns[0]) + len(self.other_rows)

    def add(self, row: dict) -> None:
        self.other_rows.append(row)

    def flush(self) -> list[pa.RecordBatch]:
        out = []
        n = len(self.columns[0])
        if n:
            by_name = dict(zip(_CANDIDATE_FIELDS, self.columns))
            arrays = []
            for f in OUTPUT_SCHEMA:
                if f.name == "kind":
                    arrays.append(pa.array([KIND_CANDIDATE] * n, type=f.type))
                elif f.name == "fetch_time":  # microseconds since the epoch: no datetime per row
                    arrays.append(pa.array(by_name[f.name], type=pa.int64()).cast(f.type))
                elif f.name in by_name:
                    arrays.append(pa.array(by_name[f.name], type=f.type))
                else:
                    arrays.append(pa.nulls(n, type=f.type))
            out.append(pa.RecordBatch.from_arrays(arrays, schema=OUTPUT_SCHEMA))
            self.columns = [[] for _ in _CANDIDATE_FIELDS]
        if self.other_rows:
            rows = self.other_rows
            out.append(pa.RecordBatch.from_arrays(
                [pa.array([r.get(f.name) for r in rows], type=f.type) for f in OUTPUT_SCHEMA],
                schema=OUTPUT_SCHEMA))
            self.other_rows = []
        return out


class FileExtractor:
    """Turns the records of one file into candidate and failure rows, counting as it goes."""

    def __init__(self, source_file: str, cfg: ExtractConfig, builder: Optional[_BatchBuilder] = None):
        self.builder = builder or _BatchBuilder(cfg.batch_rows)
        self.source_file = source_file
        self.cfg = cfg
        self.crawl = crawl_of(source_file, cfg.crawl)
        self.rules = CandidateRules(cfg)
        self.lang = LanguageIdentifier(cfg.language_min_prob)
        self.counts = FileCounts()
        self.want_warc = cfg.input_format in ("auto", "warc")
        self.want_wat = cfg.input_format in ("auto", "wat")
        if cfg.input_format not in ("auto", "warc", "wat"):
            raise ValueError(f"extract.input_format must be auto, warc or wat, got {cfg.input_format!r}")

    # which records get their whole block read
    def wants_body(self, rec: RawRecord) -> bool:
        if rec.warc_type == "response" and self.want_warc:
            if not _is_http_record(rec):
                return False
            parsed = split_http_response(rec.block)
            if parsed is None:
                return True  # let process() report the malformed header
            status, headers, start = parsed
            return 200 <= status < 300 and _looks_like_html(headers.get("content-type"), rec.block[start:])
        if rec.warc_type == "metadata" and self.want_wat:
            return "json" in (rec.content_type or "").lower()
        return False

    def failure_row(self, offset: int, error: str) -> dict:
        self.counts.n_failures += 1
        return {"kind": KIND_FAILURE, "source_file": self.source_file, "record_offset": offset,
                "error": error[:1000], "crawl": self.crawl,
                "failed_at": dt.datetime.now(dt.timezone.utc)}

    def process(self, rec: RawRecord) -> None:
        """Add the candidate rows of one record to the builder (none for records with no page)."""
        if rec.warc_type == "response" and self.want_warc and _is_http_record(rec):
            self._warc_response(rec)
        elif rec.warc_type == "metadata" and self.want_wat and "json" in (rec.content_type or "").lower():
            self._wat_metadata(rec)

    def _warc_response(self, rec: RawRecord) -> None:
        parsed = split_http_response(rec.block)
        if parsed is None:
            raise ValueError("malformed HTTP response header")
        status, headers, start = parsed
        content_type = headers.get("content-type")
        if not (200 <= status < 300) or not _looks_like_html(content_type, rec.block[start:]):
            return
        if not rec.target_uri:
            raise ValueError("HTML response without WARC-Target-URI")
        self.counts.n_html_pages += 1
        body = decode_http_body(headers, rec.block[start:])
        if len(body) > self.cfg.max_html_bytes:
            body = body[: self.cfg.max_html_bytes]
        text, _codec = decode_html(body, charset_from_content_type(content_type))
        page = extract_images(text)
        page_url = rec.target_uri.strip()
        base = resolve_base(page_url, page.base_href)
        refs = [(img.ref, img.alt, img.title, img.source) for img in page.images]
        self._candidates(refs, base, page_url, rec, "warc")

    def _wat_metadata(self, rec: RawRecord) -> None:
        block = rec.block
        if b'"HTML-Metadata"' not in block:
            return
        self.counts.n_html_pages += 1
        if b"IMG@" not in block:
            return
        start = block.find(b"{")
        doc = _loads(block[start:] if start > 0 else block)
        env = doc.get("Envelope") or {}
        header_meta = env.get("WARC-Header-Metadata") or {}
        page_url = _first(header_meta.get("WARC-Target-URI")) or rec.target_uri
        if not page_url:
            raise ValueError("WAT record without WARC-Target-URI")
        http = (env.get("Payload-Metadata") or {}).get("HTTP-Response-Metadata") or {}
        html_meta = http.get("HTML-Metadata") or {}
        head = html_meta.get("Head") or {}
        base = resolve_base(page_url, _first(head.get("Base")))
        refs = []
        for link in html_meta.get("Links") or ():
            # `path` is a plain string in every WAT version; only header values became lists.
            if link.__class__ is not dict or link.get("path") != "IMG@/src":
                continue
            ref = link.get("url")
            if ref.__class__ is not str:
                ref = _first(ref)
                if not isinstance(ref, str):
                    continue
            if not ref:
                continue
            alt = link.get("alt")
            title = link.get("title")
            refs.append((ref, alt if alt.__class__ is str else _first(alt),
                         title if title is None or title.__class__ is str else _first(title), "wat"))
        date = _first(header_meta.get("WARC-Date")) or rec.date
        self._candidates(refs, base, page_url, rec, "wat", date)

    def _candidates(self, refs: list, base: str, page_url: str, rec: RawRecord, fmt: str,
                    date: Optional[str] = None) -> None:
        counts, rules = self.counts, self.rules
        when = parse_warc_date(date or rec.date)
        fetch_time = None if when is None else int(when.timestamp() * 1_000_000)
        (c_uid, c_url, c_text, c_title, c_page, c_lang, c_prob, c_group, c_file, c_fmt, c_off,
         c_src, c_crawl, c_time) = self.builder.columns
        check_text, check_url, identify = rules.check_text, rules.check_url, self.lang.identify
        drops = counts.drops
        for ref, alt, title, source in refs:
            counts.n_images += 1
            if alt is not None and alt.strip():
                counts.n_with_alt += 1
            text, reason = check_text(alt if isinstance(alt, str) else None)
            if reason is None:
                url, reason = check_url(base, ref)
            if reason is not None:
                drops[reason] += 1
                continue
            language, prob, group = identify(text)
            counts.n_kept += 1
            c_uid.append(uid_of(url, text))
            c_url.append(url)
            c_text.append(text)
            c_title.append(normalise_title(title))
            c_page.append(page_url)
            c_lang.append(language)
            c_prob.append(prob)
            c_group.append(group)
            c_file.append(self.source_file)
            c_fmt.append(fmt)
            c_off.append(rec.offset)
            c_src.append(source)
            c_crawl.append(self.crawl)
            c_time.append(fetch_time)

    def file_row(self, seconds: float) -> dict:
        c = self.counts
        return {"kind": KIND_FILE, "source_file": self.source_file, "crawl": self.crawl,
                "n_bytes": c.n_bytes, "n_records": c.n_records, "n_html_pages": c.n_html_pages,
                "n_images": c.n_images, "n_with_alt": c.n_with_alt, "n_kept": c.n_kept,
                "n_failures": c.n_failures, "drops": json.dumps(dict(sorted(c.drops.items()))),
                "seconds": seconds, "extracted_at": dt.datetime.now(dt.timezone.utc)}


def normalise_title(title: Any) -> Optional[str]:
    if not isinstance(title, str):
        return None
    text = " ".join(title.split())
    return text or None


def open_input(path: str):
    """A seekable binary stream for a local path or any fsspec URL (s3://, https://, ...)."""
    import fsspec

    return fsspec.open(path, "rb").open()


def extract_file_batches(path: str, cfg: ExtractConfig) -> Iterator[pa.RecordBatch]:
    """Stream one WARC or WAT file: candidate rows, a failure row per bad spot, then one `file` row.

    Never raises for bad input: a file that cannot even be opened gives one failure row and a
    file row with zero counts (so a re-run does not retry a file that is simply broken)."""
    started = time.perf_counter()
    builder = _BatchBuilder(cfg.batch_rows)
    extractor = FileExtractor(path, cfg, builder)
    counts = extractor.counts
    try:
        stream = open_input(path)
    except Exception as exc:  # noqa: BLE001
        builder.add(extractor.failure_row(-1, f"cannot open: {type(exc).__name__}: {exc}"))
        builder.add(extractor.file_row(time.perf_counter() - started))
        yield from builder.flush()
        return
    try:
        try:
            stream.seek(0, 2)
            counts.n_bytes = stream.tell()
            stream.seek(0)
        except Exception:  # noqa: BLE001 - size unknown for some streams
            counts.n_bytes = -1
        max_bytes = max(cfg.max_html_bytes, 64 << 20) if extractor.want_wat else cfg.max_html_bytes
        batch_rows = cfg.batch_rows
        for item in iter_records(stream, reader=cfg.warc_reader, wants_body=extractor.wants_body,
                                 max_bytes=max_bytes):
            if isinstance(item, ReadFailure):
                builder.add(extractor.failure_row(item.offset, item.error))
            else:
                counts.n_records += 1
                mark = len(builder.columns[0])
                try:
                    extractor.process(item)
                except Exception as exc:  # noqa: BLE001 - a bad record never stops the file
                    for col in builder.columns:  # drop a half-added record's rows
                        del col[mark:]
                    builder.add(extractor.failure_row(item.offset, f"{type(exc).__name__}: {exc}"))
            if builder.n >= batch_rows:
                yield from builder.flush()
    finally:
        stream.close()
    seconds = time.perf_counter() - started
    log.info("%s: %d records, %d HTML pages, %d images, %d with alt, %d kept, %d failures (%.2fs)",
             path, counts.n_records, counts.n_html_pages, counts.n_images, counts.n_with_alt,
             counts.n_kept, counts.n_failures, seconds)
    builder.add(extractor.file_row(seconds))
    yield from builder.flush()


def extract_file_table(path: str, cfg: ExtractConfig) -> pa.Table:
    """All rows of one file as one table (tests, benchmark)."""
    return pa.Table.from_batches(list(extract_file_batches(path, cfg)), schema=OUTPUT_SCHEMA)
