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

import mmh3
import pyarrow as pa

from laion_spark.config import ExtractConfig
from laion_spark.extract.html import charset_from_content_type, decode_html, extract_images
from laion_spark.extract.records import ReadFailure, RawRecord, iter_records
from laion_spark.extract.rules import (ABSOLUTE_HTTP, DROP_EXTENSION, DROP_HOSTNAME, DROP_INVALID_URL,
                                       DROP_NO_ALT, DROP_SHORT_ALT, DROP_URL_LENGTH, CandidateRules,
                                       LanguageIdentifier, resolve_base)

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


# ------------------------------------------------------------------------------- WAT JSON
@dataclass
class WatPage:
    """What the WAT path needs from one metadata record's JSON."""

    header_meta: dict  # Envelope → WARC-Header-Metadata (WARC-Target-URI, WARC-Date)
    base_href: Any  # HTML-Metadata → Head → Base (a string, a list since Dec 2024, or None)
    img_links: list  # the HTML-Metadata → Links entries whose path is "IMG@/src"


def parse_wat_page(block: bytes) -> WatPage:
    """The whole JSON document parsed (orjson): the reference path, and the fallback of
    `parse_wat_page_fast`. Raises on JSON that does not parse (the caller makes a failure row)."""
    start = block.find(b"{")
    doc = _loads(block[start:] if start > 0 else block)
    env = doc.get("Envelope") or {}
    header_meta = env.get("WARC-Header-Metadata") or {}
    http = (env.get("Payload-Metadata") or {}).get("HTTP-Response-Metadata") or {}
    html_meta = http.get("HTML-Metadata") or {}
    head = html_meta.get("Head") or {}
    # `path` is a plain string in every WAT version; only header values became lists.
    links = [link for link in html_meta.get("Links") or ()
             if link.__class__ is dict and link.get("path") == "IMG@/src"]
    return WatPage(header_meta, head.get("Base"), links)


_IMG_KEY = b'"path":"IMG@/src"'
_LINKS_KEY = b'"Links":['
_HEAD_KEY = b'"Head":{'
_HEADER_META_KEY = b'"WARC-Header-Metadata":{'
_json_decoder = json.JSONDecoder()


def parse_wat_page_fast(block: bytes) -> Optional[WatPage]:
    """The same WatPage as `parse_wat_page`, without building the whole document, or None.

    A WAT response record is mostly its `Links` array (hundreds of `A@/href` entries), and only
    the `IMG@/src` entries, the WARC header metadata and `Head.Base` are needed. A byte scan of a
    record costs a tenth to a fifth of a full orjson parse, so this makes about two.

    In compact JSON (Common Crawl's) the bytes `"path":"IMG@/src"` cannot lie inside a string
    (its quotes would be escaped), so each is a key of one flat link object: the object is cut
    from the `{` before it to the `}` after it and only those objects are parsed. A cut that lands
    inside a string (a `{` or `}` in an alt text) cannot parse as one object, and parts that merge
    change the count. It does not validate the rest of the document: a payload cut exactly
    after a `}` (a producer bug; a short WARC record is caught by the reader) gives the links it
    holds rather than a failure row. A record that does not end in `}`, is not compact (`"Links":[` and
    `"WARC-Header-Metadata":{` not found as such), or has a `Base` outside a found `Head`
    returns None, and the caller parses the whole document. Structural keys are taken where
    Common Crawl's schema puts them (`IMG@/src` entries only inside `Links`, `Head` before or
    after it). The differential tests check that both functions give the same page on real and
    adversarial records."""
    if not block.rstrip().endswith(b"}"):
        return None  # truncated: the whole-document parse reports it
    links_at = block.find(_LINKS_KEY)
    meta_at = block.find(_HEADER_META_KEY)
    if links_at < 0 or meta_at < 0:
        return None
    parts = []
    end = links_at
    pos = block.find(_IMG_KEY, links_at)
    while pos >= 0:
        start = block.rfind(b"{", end, pos)
        end = block.find(b"}", pos)
        if start < 0 or end < 0:
            return None
        parts.append(block[start:end + 1])
        pos = block.find(_IMG_KEY, end)
    if not parts:
        return None
    # Head follows Links in Common Crawl's WATs (so search on from the last image), else precedes it
    head_at = block.find(_HEAD_KEY, end)
    if head_at < 0:
        head_at = block.find(_HEAD_KEY, 0, links_at)
    try:
        links = _loads(b"[" + b",".join(parts) + b"]")
        header_start = meta_at + len(_HEADER_META_KEY) - 1
        header_meta = _loads(block[header_start:block.index(b"}", header_start) + 1])
        base = None
        if head_at < 0:
            if b'"Base"' in block:
                return None  # a Head this does not find
        elif block.find(b'"Base"', head_at) >= 0:
            # rare (few pages have <base>): decode the Head object exactly (it nests arrays)
            head_start = head_at + len(_HEAD_KEY) - 1
            head, _ = _json_decoder.raw_decode(block[head_start:].decode("utf-8"))
            base = head.get("Base")
    except (ValueError, UnicodeDecodeError):
        return None
    if len(links) != len(parts) or header_meta.__class__ is not dict:
        return None
    # (each part starts with "{", so each parsed link is a dict; the caller checks each `path`,
    # since a JSON object may repeat a key and the last one counts)
    return WatPage(header_meta, base, links)


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
        wtype = rec.warc_type
        if wtype == "metadata":
            if self.want_wat:
                self._wat_metadata(rec)
        elif wtype == "response" and self.want_warc and _is_http_record(rec):
            self._warc_response(rec)

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
        """A WAT JSON record of an HTML page: its `IMG@/src` links. Most WAT records (request,
        metadata, non-HTML responses) are skipped on one byte search; the content type is only
        read for the others (a look-up costs as much as that search)."""
        block = rec.block
        if b'"HTML-Metadata"' not in block or "json" not in (rec.content_type or "").lower():
            return
        self.counts.n_html_pages += 1
        if b"IMG@" not in block:
            return
        page = parse_wat_page_fast(block)
        if page is None:
            page = parse_wat_page(block)
        page_url = _first(page.header_meta.get("WARC-Target-URI")) or rec.target_uri
        if not page_url:
            raise ValueError("WAT record without WARC-Target-URI")
        base = resolve_base(page_url, _first(page.base_href))
        # (a repeated `path` key: the last one counts, as in the whole-document parse)
        refs = [(link.get("url"), link.get("alt"), link.get("title"), "wat")
                for link in page.img_links if link.get("path") == "IMG@/src"]
        date = _first(page.header_meta.get("WARC-Date")) or rec.date
        self._candidates(refs, base, page_url, rec, "wat", date)

    def _candidates(self, refs: list, base: str, page_url: str, rec: RawRecord, fmt: str,
                    date: Optional[str] = None) -> None:
        """Apply the rules to one page's references (cheap text rule first, then the URL rules,
        language id only for kept ones) and append the kept rows column by column. The hot loop
        of both paths: everything it needs is bound to locals."""
        counts = self.counts
        when = parse_warc_date(date or rec.date)
        fetch_time = None if when is None else int(when.timestamp() * 1_000_000)
        (c_uid, c_url, c_text, c_title, c_page, c_lang, c_prob, c_group, c_file, c_fmt, c_off,
         c_src, c_crawl, c_time) = self.builder.columns
        rules = self.rules
        check_url, identify, hash64 = rules.check_url, self.lang.identify, mmh3.hash64
        absolute_http, fast_http, extensions = ABSOLUTE_HTTP, rules.fast_http, rules.extensions
        any_extension, max_host, max_url = rules.any_extension, rules.max_hostname_length, rules.max_url_length
        min_len, max_len = self.cfg.min_text_length, self.cfg.max_text_length
        drops = counts.drops
        offset, source_file, crawl = rec.offset, self.source_file, self.crawl
        n_with_alt = n_kept = 0
        n_not_images = 0
        for ref, alt, title, source in refs:
            if ref.__class__ is not str or not ref:
                # WAT values may be lists (Common Crawl's format since December 2024); a link
                # with no URL is not an image
                ref = _first(ref)
                if not ref or not isinstance(ref, str):
                    n_not_images += 1
                    continue
            if alt.__class__ is not str:
                alt = _first(alt)
                if not isinstance(alt, str):
                    drops[DROP_NO_ALT] += 1
                    continue
            text = " ".join(alt.split())
            if text:
                n_with_alt += 1
            if len(text) < min_len:
                drops[DROP_SHORT_ALT] += 1
                continue
            if len(text) > max_len:
                text = text[:max_len]
            # The common case inline: an absolute http(s) URL (what rules.check_url does first).
            ref = ref.strip()
            m = absolute_http(ref) if fast_http else None
            if m is not None:
                host = m.group(1)
                if not host:
                    drops[DROP_INVALID_URL] += 1
                    continue
                if extensions:
                    low_url = ref.lower()
                    if any_extension(low_url):
                        drops[DROP_EXTENSION] += 1
                        continue
                # (str.lower() never shortens; only a non-ASCII host can grow)
                if len(host) > max_host or (not host.isascii() and len(host.lower()) > max_host):
                    drops[DROP_HOSTNAME] += 1
                    continue
                if len(ref) > max_url:
                    drops[DROP_URL_LENGTH] += 1
                    continue
                url = ref
            else:
                url, reason = check_url(base, ref)
                if reason is not None:
                    drops[reason] += 1
                    continue
            language, prob, group = identify(text)
            n_kept += 1
            c_uid.append(hash64(url + text)[0])  # = rules.uid_of(url, text)
            c_url.append(url)
            c_text.append(text)
            c_title.append(None if title is None else normalise_title(_first(title)))
            c_page.append(page_url)
            c_lang.append(language)
            c_prob.append(prob)
            c_group.append(group)
            c_file.append(source_file)
            c_fmt.append(fmt)
            c_off.append(offset)
            c_src.append(source)
            c_crawl.append(crawl)
            c_time.append(fetch_time)
        counts.n_images += len(refs) - n_not_images
        counts.n_with_alt += n_with_alt
        counts.n_kept += n_kept

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
        process = extractor.process
        first_column = builder.columns[0]
        n_records = 0
        for item in iter_records(stream, reader=cfg.warc_reader, wants_body=extractor.wants_body,
                                 max_bytes=max_bytes):
            if item.__class__ is ReadFailure:
                builder.add(extractor.failure_row(item.offset, item.error))
            else:
                n_records += 1
                mark = len(first_column)
                try:
                    process(item)
                except Exception as exc:  # noqa: BLE001 - a bad record never stops the file
                    for col in builder.columns:  # drop a half-added record's rows
                        del col[mark:]
                    builder.add(extractor.failure_row(item.offset, f"{type(exc).__name__}: {exc}"))
            if len(first_column) + len(builder.other_rows) >= batch_rows:
                counts.n_records = n_records
                yield from builder.flush()
                first_column = builder.columns[0]
        counts.n_records = n_records
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
