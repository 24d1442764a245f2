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
from laion_spark.extract.html import (charset_from_content_type, decode_html_sniffed, extract_images,
                                     html_nesting)
from laion_spark.extract.records import (ExtractError, ReadFailure, RawRecord, clean_target_uri,
                                         error_text, iter_records)
from laion_spark.extract.rules import (ABSOLUTE_HTTP, DROP_EXTENSION, DROP_HOSTNAME, DROP_INVALID_URL,
                                       DROP_NO_ALT, DROP_SHORT_ALT, DROP_URL_LENGTH, CandidateRules,
                                       LanguageIdentifier, resolve_base)
from laion_spark.extract.textfix import fix_text

try:  # orjson is ~3x faster on WAT payloads; json is the fallback
    import orjson as _json

    _loads = _json.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger(__name__)

# Counted in the file row's `drops` (not reasons a reference is dropped, but how pages were read):
DROP_HTML_CUT = "html_cut"  # a page over max_html_bytes, read up to that size
DROP_META_CHARSET_ON_UTF8 = "meta_charset_on_utf8"  # <meta> named a legacy charset, bytes were UTF-8

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
    """The date of a WARC-Date (ISO 8601), or None when it does not parse or does not fit a
    datetime once made UTC (`0001-01-01T00:00:00+23:59` is before year 1)."""
    if not value or value.__class__ is not str:
        return None
    try:
        d = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        if d.tzinfo is None:
            return d.replace(tzinfo=dt.timezone.utc)
        return d.astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):
        return None


def fetch_time_us(value: Optional[str], min_year: int) -> tuple[Optional[int], Optional[str]]:
    """(microseconds since the epoch, None) for a WARC-Date in [min_year, now + 1 day], else
    (None, why): the row keeps a null fetch_time and the record gets a `bad_date` failure note."""
    if not value:
        return None, None
    when = parse_warc_date(value)
    if when is None:
        return None, f"WARC-Date {str(value)[:60]!r} does not parse"
    if when.year < min_year or when > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1):
        return None, f"WARC-Date {str(value)[:60]!r} outside [{min_year}, now + 1 day]"
    return int(when.timestamp() * 1_000_000), None


# Characters no C extension (mmh3, gcld3, selectolax) may see: lone surrogates (the stdlib json
# and `surrogateescape` make them), NUL and the other C0/DEL controls except tab, LF, CR.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_bad_chars = _BAD_CHARS.search
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Alt/title text as LAION cleaned it: lone surrogates → U+FFFD, then `ftfy.fix_text`
    (mojibake, HTML entities, control characters), then the remaining controls dropped. ASCII
    without `&` or ESC is what ftfy returns unchanged up to controls and line breaks (tested),
    so it skips ftfy (most alt text); other text goes through `textfix.fix_text`, ftfy's own
    steps minus those that cannot act (same output, tested; ~3x faster on real alt text)."""
    if text.isascii() and "&" not in text and "\x1b" not in text:
        return _BAD_CHARS.sub("", text) if _bad_chars(text) else text
    if _SURROGATES.search(text):
        text = _SURROGATES.sub("\ufffd", text)
    text = fix_text(text)
    return _BAD_CHARS.sub("", text) if _bad_chars(text) else text


def clean_url(ref: str) -> Optional[str]:
    """A URL reference safe to hash, or None: tab/LF/CR are removed (the URL standard strips
    them), any other control or a lone surrogate makes it unusable."""
    if "\t" in ref or "\n" in ref or "\r" in ref:
        ref = ref.replace("\t", "").replace("\n", "").replace("\r", "")
    if _bad_chars(ref):
        return None
    return ref


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


# (status, lower-cased headers, body start) of an HTTP response block; the header must end
# within this many bytes (the reader hands over at least the first 16 KiB of a block).
_MAX_HTTP_HEADER_BYTES = 65536


_LIST_HEADERS = frozenset(("content-encoding", "transfer-encoding"))


def split_http_response(block: bytes) -> Optional[tuple[int, dict[str, str], int]]:
    """(status, lower-cased headers, body start) of an HTTP response block, or None if it is not one.

    The header ends at the first blank line of either form (`\n\n` or `\n\r\n`): old servers
    and ClueWeb-era WARCs end header lines with a bare LF, and a `\r\n\r\n` found first would
    lie deep inside their HTML."""
    head_end = min(len(block), _MAX_HTTP_HEADER_BYTES)
    lf = block.find(b"\n\n", 0, head_end)
    crlf = block.find(b"\n\r\n", 0, head_end)
    if lf < 0 and crlf < 0:
        return None
    if crlf >= 0 and (lf < 0 or crlf < lf):
        end, body_start = crlf, crlf + 3
    else:
        end, body_start = lf, lf + 2
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
            name = name.strip().lower()
            if name in _LIST_HEADERS and name in headers:  # repeated: one list, as HTTP reads it
                headers[name] += ", " + value.strip()
            else:
                headers[name] = value.strip()
    return status, headers, body_start


def _dechunk(body: bytes, max_bytes: int) -> tuple[bytes, bool]:
    """Undo chunked transfer coding: (data, cut at max_bytes). Each step moves forward, so it ends
    on any input; a size line that is not a non-negative hex number ends the data there (a
    body that does not start with one is taken as not really chunked and kept as is)."""
    out: list[bytes] = []
    got = i = 0
    n = len(body)
    while i < n:
        j = body.find(b"\n", i, i + 1024)
        if j < 0:
            break
        token = body[i:j].split(b";", 1)[0].strip()
        if not token or token.strip(b"0123456789abcdefABCDEF"):
            if i == 0:
                return body[:max_bytes], len(body) > max_bytes
            break  # garbage or a negative size: what came before is the body
        size = int(token, 16)
        if size == 0:
            break
        chunk = body[j + 1:j + 1 + size]
        if got + len(chunk) > max_bytes:
            out.append(chunk[:max_bytes - got])
            return b"".join(out), True
        out.append(chunk)
        got += len(chunk)
        i = j + 1 + size
        if body[i:i + 2] == b"\r\n":
            i += 2
        elif body[i:i + 1] == b"\n":
            i += 1
    return b"".join(out), False


_ZLIB_STARTS = (b"\x1f\x8b", b"\x78\x9c", b"\x78\x01", b"\x78\xda", b"\x78\x5e")


def _inflate(body: bytes, wbits: int, max_bytes: int) -> tuple[bytes, bool]:
    """Inflate at most max_bytes of output (the cap is on what comes out: a 4 MB bomb never
    becomes 3 GB); (data, cut). Gzip members after the first are inflated too, under the cap."""
    out: list[bytes] = []
    got = 0
    data = body
    while data:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, max_bytes - got + 1)
        except zlib.error:
            if not out and got == 0:
                raise
            break
        out.append(chunk)
        got += len(chunk)
        if got > max_bytes or d.unconsumed_tail:
            return b"".join(out)[:max_bytes], True
        data = d.unused_data if d.eof and wbits == 47 else b""
    return b"".join(out), False


def _unbrotli(body: bytes, max_bytes: int) -> tuple[bytes, bool]:
    import brotli

    d = brotli.Decompressor()
    out = [d.process(body, output_buffer_limit=max_bytes + 1)]
    got = len(out[0])
    while got <= max_bytes and not d.is_finished() and not d.can_accept_more_data():
        more = d.process(b"", output_buffer_limit=max_bytes + 1 - got)
        if not more:
            break
        out.append(more)
        got += len(more)
    data = b"".join(out)
    return data[:max_bytes], got > max_bytes


def decode_http_body(headers: dict[str, str], body: bytes,
                     max_bytes: int = 5_000_000) -> tuple[bytes, bool]:
    """Undo chunked transfer and gzip/deflate/br content encoding where the crawler kept them,
    streaming with the output capped at max_bytes: (body, cut). A body that does not decode as
    its Content-Encoding says is kept as is (crawlers often store the decoded body and keep the
    header)."""
    cut = False
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, cut = _dechunk(body, max_bytes)
    encoding = headers.get("content-encoding", "").lower().strip()
    if "," not in encoding:
        decoded = _decode_content(encoding, body, max_bytes)
        if decoded is not None:
            return decoded
    else:
        # `gzip, br`: applied in that order, so undone last first (at most _MAX_CODINGS, each
        # capped at max_bytes); the first that does not decode leaves the body as it is then.
        codings = [c.strip() for c in encoding.split(",") if c.strip() not in ("", "identity")]
        for coding in reversed(codings[-_MAX_CODINGS:]):
            decoded = _decode_content(coding, body, max_bytes)
            if decoded is None:
                break
            body, more_cut = decoded
            cut = cut or more_cut
    if len(body) > max_bytes:
        return body[:max_bytes], True
    return body, cut


_MAX_CODINGS = 4  # content codings undone per body (`gzip, gzip`; a longer list is a trick)


def _decode_content(encoding: str, body: bytes, max_bytes: int) -> Optional[tuple[bytes, bool]]:
    """(body, cut) with one content coding undone, or None when the body is not in it."""
    if encoding in ("gzip", "x-gzip", "deflate") and body[:2] in _ZLIB_STARTS:
        try:
            return _inflate(body, 47 if body[:2] == b"\x1f\x8b" else 15, max_bytes)
        except zlib.error:
            try:
                return _inflate(body, -15, max_bytes)
            except zlib.error:
                pass
    elif encoding == "deflate" and not _looks_like_html(None, body[:512]):  # raw deflate (no zlib header), as some servers send
        try:
            return _inflate(body, -15, max_bytes)
        except zlib.error:
            pass
    elif encoding == "br" and not _looks_like_html(None, body[:512]):
        try:
            return _unbrotli(body, max_bytes)
        except Exception:  # noqa: BLE001 - brotli.error: not really brotli, keep the bytes
            pass
    return None


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
_URI_EDGES = frozenset("<> \t\r\n")  # first or last characters of a WARC-Target-URI to clean
@dataclass
class WatPage:
    """What the WAT path needs from one metadata record's JSON."""

    header_meta: dict  # Envelope → WARC-Header-Metadata (WARC-Target-URI, WARC-Date)
    base_href: Any  # HTML-Metadata → Head → Base (a string, a list since Dec 2024, or None)
    img_links: list  # the HTML-Metadata → Links entries whose path is "IMG@/src"


def _as_dict(value: Any) -> dict:
    """A JSON object, or {} for anything else (a WAT value of the wrong type reads as absent)."""
    return value if value.__class__ is dict else {}


def _load_json(data: bytes) -> Any:
    try:
        return _loads(data)
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        text = str(exc)
        code = "too_deep" if "depth" in text.lower() or "recursion" in text.lower() else "bad_json"
        raise ExtractError(code, text[:300]) from None


def _page_of(doc: Any, links: Optional[list] = None) -> WatPage:
    """The WatPage of a parsed document; `links` (the fast path's) replaces `Links` when given."""
    env = _as_dict(_as_dict(doc).get("Envelope"))
    header_meta = _as_dict(env.get("WARC-Header-Metadata"))
    http = _as_dict(_as_dict(env.get("Payload-Metadata")).get("HTTP-Response-Metadata"))
    html_meta = _as_dict(http.get("HTML-Metadata"))
    head = _as_dict(html_meta.get("Head"))
    if links is None:
        # `path` is a plain string in every WAT version; only header values became lists.
        found = html_meta.get("Links")
        links = [link for link in (found if found.__class__ is list else ())
                 if link.__class__ is dict and link.get("path") == "IMG@/src"]
    return WatPage(header_meta, head.get("Base"), links)


def parse_wat_page(block: bytes) -> WatPage:
    """The whole JSON document parsed (orjson): the reference path, and the fallback of
    `parse_wat_page_fast`. Raises ExtractError (`bad_json`, `too_deep`) on JSON that does not
    parse; orjson refuses lone surrogates and nests at most 1,024 deep."""
    start = block.find(b"{")
    return _page_of(_load_json(block[start:] if start > 0 else block))


_IMG_KEY = b'"path":"IMG@/src"'
_LINKS_KEY = b'"Links":['
_CUT = b'"\\u0000links-cut"'  # what the rest's Links array holds instead: a JSON string no WAT has
_CUT_VALUE = "\x00links-cut"
_NOT_CLOSING = frozenset(b':,{[\\ \t\n\r')


def _links_end(block: bytes, open_at: int) -> int:
    """Index of the `]` that closes a Links array of flat objects opened just before open_at,
    or -1 when that is not certain. Walks the `[` and `]` bytes only (single-byte scans): a `[`
    after `":`, `[` or `,` may open a nested array (-1); a `]` is the close when it follows `"}`
    whose quote is a real delimiter (an even run of backslashes before it) that cannot be a
    string's opening quote (not after `:`, `,`, `{`, `[` or a space), and is followed by `}` or
    `,`. A `]` after `}` with no quote (a non-string last value) or after `]` is not decided
    (-1); any other `]` lies inside a string."""
    find = block.find
    k = open_at
    while True:
        k = find(b"]", k)
        if k < 0:
            return -1
        if k == open_at:  # "Links":[]
            return k if block[k + 1:k + 2] in (b"}", b",") else -1
        prev = block[k - 1]
        if prev == 0x7D:  # "}"
            if block[k - 2] != 0x22:  # '"'
                return -1
            j = k - 3
            while block[j] == 0x5C:  # "\\"
                j -= 1
            if (k - 3 - j) % 2 == 0:  # the quote is a delimiter
                if j == k - 3 and block[j] in _NOT_CLOSING:
                    return -1
                break
        elif prev == 0x5D:  # "]"
            return -1
        k += 1
    if block[k + 1:k + 2] not in (b"}", b","):
        return -1
    i = open_at
    while True:
        i = find(b"[", i, k)
        if i < 0:
            return k
        if block[i - 1] in b"[," or block[i - 2:i] == b'":':
            return -1
        i += 1


def parse_wat_page_fast(block: bytes) -> Optional[WatPage]:
    """The same WatPage as `parse_wat_page`, building only the image links, or None (then the
    caller parses the whole document).

    A WAT response record is mostly its `Links` array (hundreds of `A@/href` objects), and only
    the `IMG@/src` ones are needed. The document is parsed by orjson with the `Links` array
    replaced by a marker (`"Links":["\\u0000links-cut"]`), so every other value (header
    metadata, `Head.Base`, duplicate keys, wrong types, lone surrogates) is exactly the full
    parse's, and the marker must come out where the full parse reads `Links` (else the cut was
    not the `Links` that counts). Of the array, only the `"path":"IMG@/src"` objects are parsed:
    in compact JSON (Common Crawl's) those bytes cannot lie inside a string (its quotes would be
    escaped), so each is a key of an object, cut from the `{` before it to the `}` after it.
    It returns None whenever the cut is not certain (all checks are single-byte scans, or scans
    of short spans, as multi-byte searches over the array cost as much as orjson):
    - the array ends at its first `]`, which must close a string and an object (`"}]`, the
      quote not after `:`, `,`, `{`, `[`, `\\` or a space) and be followed by `}` or `,`; no `[`
      before it (no nested arrays) and no second `"Links":[` after it;
    - each cut object must follow `[` or `,` (an element, not a nested value) and parse as one
      object; an array holding a `\\` must hold no `\\u` or `\\/` (an escaped `IMG@\\/src` is
      the same JSON string).
    Not checked: JSON syntax inside the `A@/href` objects that are skipped (a producer bug)."""
    links_at = block.find(_LINKS_KEY)
    if links_at < 0:
        return None
    open_at = links_at + len(_LINKS_KEY)  # just after "["
    end_of_array = _links_end(block, open_at)
    if end_of_array < 0:
        return None
    if block.find(b"\\", open_at, end_of_array) >= 0 and (
            block.find(b"\\u", open_at, end_of_array) >= 0 or block.find(b"\\/", open_at, end_of_array) >= 0):
        return None
    if block.find(_LINKS_KEY, end_of_array) >= 0:
        return None
    parts = []
    end = open_at
    pos = block.find(_IMG_KEY, open_at, end_of_array)
    while pos >= 0:
        start = block.rfind(b"{", end, pos)
        end = block.find(b"}", pos, end_of_array)
        if start < 0 or end < 0 or block[start - 1] not in b"[,":
            return None
        parts.append(block[start:end + 1])
        pos = block.find(_IMG_KEY, end, end_of_array)
    if not parts:
        return None
    doc_start = block.find(b"{")
    rest = block[doc_start if doc_start > 0 else 0:open_at] + _CUT + block[end_of_array:]
    try:
        links = _loads(b"[" + b",".join(parts) + b"]")
        doc = _loads(rest)
    except ValueError:
        return None
    if len(links) != len(parts):
        return None
    env = _as_dict(_as_dict(doc).get("Envelope"))
    html_meta = _as_dict(_as_dict(_as_dict(env.get("Payload-Metadata")).get(
        "HTTP-Response-Metadata")).get("HTML-Metadata"))
    cut = html_meta.get("Links")
    if cut.__class__ is not list or len(cut) != 1 or cut[0] != _CUT_VALUE:
        return None  # the cut was not the Links that counts
    # (each part starts with "{", so each parsed link is a dict; the caller checks each `path`,
    # since a JSON object may repeat a key and the last one counts)
    return _page_of(doc, links)


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
        self.notes: list[tuple[int, str]] = []  # (offset, `code: detail`) failure notes of records that still gave rows
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
            raise ExtractError("bad_http", "malformed HTTP response header")
        status, headers, start = parsed
        content_type = headers.get("content-type")
        if not (200 <= status < 300) or not _looks_like_html(content_type, rec.block[start:]):
            return
        if not rec.target_uri:
            raise ExtractError("no_target_uri", "HTML response without WARC-Target-URI")
        self.counts.n_html_pages += 1
        cfg = self.cfg
        body, cut = decode_http_body(headers, rec.block[start:], cfg.max_html_bytes)
        if cut or (not rec.complete and rec.content_length > len(rec.block)):
            self.counts.drops[DROP_HTML_CUT] += 1  # the page's first max_html_bytes are used
        too_deep = html_nesting(body, cfg.max_html_depth, cfg.max_html_parse_work)
        if too_deep is not None:
            raise ExtractError("too_deep", too_deep)
        text, _codec, source = decode_html_sniffed(body, charset_from_content_type(content_type))
        if source == "meta_on_utf8":
            self.counts.drops[DROP_META_CHARSET_ON_UTF8] += 1
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
        if not rec.complete or len(block) > self.cfg.max_wat_json_bytes:
            raise ExtractError("too_large", f"WAT JSON of {rec.content_length} bytes, over "
                                            f"max_wat_json_bytes={self.cfg.max_wat_json_bytes}")
        if b"IMG@" not in block:
            return
        page = parse_wat_page_fast(block)
        if page is None:
            page = parse_wat_page(block)
        page_url = _first(page.header_meta.get("WARC-Target-URI")) or rec.target_uri
        if page_url.__class__ is str and (page_url[:1] in _URI_EDGES or page_url[-1:] in _URI_EDGES):
            page_url = clean_target_uri(page_url)  # `<http://…>` (from a wget WARC), spaces
        if not page_url or page_url.__class__ is not str:
            raise ExtractError("no_target_uri", "WAT record without WARC-Target-URI")
        base = _first(page.base_href)
        base = resolve_base(page_url, base if base.__class__ is str else None)
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
        if len(page_url) > self.cfg.max_page_url_length:
            raise ExtractError("bad_url", f"page URL of {len(page_url)} characters, over "
                                          f"max_page_url_length={self.cfg.max_page_url_length}")
        fetch_time, bad_date = fetch_time_us(date or rec.date, self.cfg.min_fetch_year)
        if bad_date is not None:
            self.notes.append((rec.offset, f"bad_date: {bad_date}"))
        if _bad_chars(page_url):  # the WARC header's URI: checked once, before any C code hashes it
            page_url = clean_url(page_url)
            if page_url is None:
                raise ExtractError("bad_url", "WARC-Target-URI holds control characters or "
                                              "lone surrogates")
        if _bad_chars(base):
            base = clean_url(base) or page_url
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
            if not (alt.isascii() and alt.isprintable()) or "&" in alt:  # (C-level tests)
                alt = clean_text(alt)
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
            if not ref.isprintable():  # (controls, tab/LF/CR, lone surrogates, some format chars)
                ref = clean_url(ref)
                if not ref:
                    drops[DROP_INVALID_URL] += 1
                    continue
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
            c_title.append(None if title is None else normalise_title(_first(title), max_len))
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


def normalise_title(title: Any, max_length: Optional[int] = None) -> Optional[str]:
    """The title as the alt text is kept: cleaned, whitespace-normalised, cut at max_length
    (`max_text_length`: a page's `title` attribute is as hostile as its alt)."""
    if not isinstance(title, str):
        return None
    text = " ".join(clean_text(title).split())
    if max_length is not None and len(text) > max_length:
        text = text[:max_length]
    return text or None


def open_input(path: str):
    """A seekable binary stream for a local path or any fsspec URL (s3://, https://, ...)."""
    import fsspec

    return fsspec.open(path, "rb").open()


def extract_file_batches(path: str, cfg: ExtractConfig, opener=None) -> Iterator[pa.RecordBatch]:
    """Stream one WARC or WAT file: candidate rows, a failure row per bad spot, then one `file` row.

    Never raises for bad input: a file that cannot even be opened gives one failure row and a
    file row with zero counts (so a re-run does not retry a file that is simply broken).
    `opener(path)` replaces `open_input` (the Spark job wraps the stream to spot transient I/O
    errors, which it retries instead of keeping their failure rows)."""
    started = time.perf_counter()
    builder = _BatchBuilder(cfg.batch_rows)
    extractor = FileExtractor(path, cfg, builder)
    counts = extractor.counts
    try:
        stream = (opener or open_input)(path)
    except Exception as exc:  # noqa: BLE001
        builder.add(extractor.failure_row(-1, f"cannot_open: {type(exc).__name__}: {exc}"))
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
        # (a WAT record over max_wat_json_bytes is read no further than that: `too_large`)
        max_bytes = max(cfg.max_html_bytes, cfg.max_wat_json_bytes + 1) if extractor.want_wat \
            else cfg.max_html_bytes
        batch_rows = cfg.batch_rows
        process = extractor.process
        first_column = builder.columns[0]
        n_records = 0
        notes = extractor.notes
        for item in iter_records(stream, reader=cfg.warc_reader, wants_body=extractor.wants_body,
                                 max_bytes=max_bytes, verify_digests=cfg.verify_digests,
                                 max_failures=cfg.max_read_failures):
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
                    notes.clear()
                    builder.add(extractor.failure_row(item.offset, error_text(exc)))
                if notes:
                    for offset, note in notes:
                        builder.add(extractor.failure_row(offset, note))
                    notes.clear()
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
