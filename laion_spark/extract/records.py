"""Streaming WARC record reader that survives bad input.

Both FastWARC and warcio stop a file at the first corrupt gzip member or malformed header. Common
Crawl writes one gzip member per record, so after an error we look for the next member start
(gzip magic `1f 8b 08`, or `WARC/1.` in an uncompressed file) past the last good record and go on
from there: one `ReadFailure` per bad spot, every good record still read. The file is never held
in memory: records come off a seekable stream (local file or fsspec remote file).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_MAGIC = b"WARC/1."
HEAD_BYTES = 16384
_SCAN_CHUNK = 1 << 20


class RawRecord:
    """One WARC record's header fields and (a prefix of, or all of) its block.

    A plain slotted class rather than a dataclass: one is made per record (tens of thousands per
    file). With FastWARC, `target_uri`, `date` and `content_type` are read from the header map
    only when asked for: most WAT records need none of them, and each look-up costs about as
    much as the rest of the record's bookkeeping."""

    __slots__ = ("offset", "warc_type", "content_length", "block", "complete", "truncated",
                 "_target_uri", "_date", "_content_type", "_headers", "_digest")

    def __init__(self, offset: int, warc_type: str, target_uri: Optional[str], date: Optional[str],
                 content_type: Optional[str], content_length: int, block: bytes, complete: bool,
                 truncated: bool, headers: Any = None, digest: Optional[str] = None):
        self.offset = offset
        self.warc_type = warc_type
        self.content_length = content_length
        self.block = block
        self.complete = complete  # the whole block was read and had Content-Length bytes
        self.truncated = truncated  # the stream ended before Content-Length bytes
        self._target_uri = target_uri
        self._date = date
        self._content_type = content_type
        self._headers = headers  # FastWARC header map: the three fields above come from it lazily
        self._digest = digest

    @property
    def target_uri(self) -> Optional[str]:
        if self._headers is not None:
            self._resolve_headers()
        return self._target_uri

    @property
    def date(self) -> Optional[str]:
        if self._headers is not None:
            self._resolve_headers()
        return self._date

    @property
    def content_type(self) -> Optional[str]:
        if self._headers is not None:
            self._resolve_headers()
        return self._content_type

    @property
    def block_digest(self) -> Optional[str]:
        if self._headers is not None:
            self._resolve_headers()
        digest = self._digest
        if digest.__class__ is not str and digest is not None:  # a FastWARC header map
            digest = self._digest = digest.get("WARC-Block-Digest")
        return digest

    def _resolve_headers(self) -> None:
        headers, self._headers = self._headers, None
        self._target_uri = clean_target_uri(headers.get("WARC-Target-URI"))
        self._date = headers.get("WARC-Date")
        self._content_type = headers.get("Content-Type")
        self._digest = headers  # WARC-Block-Digest is looked up when asked for (rarely)

    def __repr__(self) -> str:
        return (f"RawRecord(offset={self.offset}, warc_type={self.warc_type!r}, "
                f"target_uri={self.target_uri!r}, content_length={self.content_length})")


class ExtractError(ValueError):
    """A record that cannot give rows, with a stable snake_case code: the failure row's error is
    `code: detail`, so failures can be counted by code across crawls.

    Codes: too_large, too_deep, timeout, truncated, bad_gzip, bad_warc_header, digest_mismatch,
    bad_http, bad_json, no_target_uri, bad_date, cannot_open, unsupported_compression,
    too_many_failures, internal_error."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def error_text(exc: BaseException) -> str:
    """`code: detail` of any exception: ExtractError keeps its code, a reader's own exception
    maps to a code by type, anything else is `internal_error` (a bug of ours, with its type)."""
    if isinstance(exc, ExtractError):
        return str(exc)
    name = type(exc).__name__
    text = f"{name}: {exc}"[:2000]  # (warcio's can hold a whole junk "line": megabytes)
    low = text.lower()
    if isinstance(exc, MemoryError):
        return f"too_large: {text}"
    if isinstance(exc, RecursionError):
        return f"too_deep: {text}"
    if "gzip" in low or "zlib" in low or "decompress" in low or name in ("BadGzipFile", "EOFError"):
        return f"bad_gzip: {text}"
    if "warc" in low or "header" in low or name == "ArchiveLoadFailed":
        return f"bad_warc_header: {text}"
    return f"internal_error: {text}"


@dataclass
class ReadFailure:
    """A spot of the file that could not be read (corrupt gzip, truncation, malformed header);
    `error` is `code: detail` (ExtractError's codes)."""

    offset: int
    error: str


# Decides, from a record with the first HEAD_BYTES of its block, whether the rest is wanted.
WantsBody = Callable[[RawRecord], bool]


def clean_target_uri(uri: Optional[str]) -> Optional[str]:
    """wget writes `WARC-Target-URI: <https://...>` (a WARC 1.1 draft form); strip the brackets
    (also from a WAT's JSON copy of the header, made from such a WARC)."""
    if uri is None:
        return None
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1].strip()
    return uri


# A record header inside a block: the block swallowed the next record (a Content-Length too large).
_SWALLOWED = b"\r\nWARC/1."


_CR_VISITS = 16


def holds_record_header(block: bytes) -> bool:
    """Whether a block holds a record header after a line break (`_SWALLOWED in block`).

    Most blocks hold a `\r` only in their HTTP header (HTML bodies mostly end lines with a bare
    LF; WAT JSON has none), so the first `_CR_VISITS` `\r` are visited with `find` of one byte
    (memchr) and the substring search runs only from the next one on: 25 vs 80 ms on the
    benchmark WARC (126 MB of blocks), where a substring search over a whole block is slowed
    down by the `.`, `/`, `1` and `\n` of its needle, frequent in HTML. (A numpy byte compare
    was tried: slower, each call allocates a block-sized mask.)"""
    find = block.find
    i = find(b"\r")
    for _ in range(_CR_VISITS):
        if i < 0:
            return False
        if block.startswith(_SWALLOWED, i):
            return True
        i = find(b"\r", i + 1)
    return i >= 0 and find(_SWALLOWED, i) >= 0


def block_digest_ok(rec: RawRecord, digest: Optional[str]) -> bool:
    """Whether a complete block matches its `WARC-Block-Digest` (sha1, base32 or hex); True when
    there is none or its algorithm is not sha1/md5/sha256 (nothing to check against)."""
    if not digest or not rec.complete:
        return True
    algo, _, value = digest.strip().partition(":")
    algo = algo.strip().lower().replace("-", "")
    if algo not in ("sha1", "md5", "sha256") or not value:
        return True
    raw = hashlib.new(algo, rec.block).digest()
    value = value.strip()
    if len(value) == 2 * len(raw):
        return value.lower() == raw.hex()
    return value.upper().rstrip("=") == base64.b32encode(raw).decode("ascii").rstrip("=")


# Compressed formats a WARC is sometimes stored in that the readers cannot read (FastWARC reads
# LZ4 only with a build option); each is named by its magic bytes.
_OTHER_COMPRESSION = ((re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)").match, "bzip2"),
                      (re.compile(rb"\xfd7zXZ\x00").match, "xz"),
                      (re.compile(rb"\x28\xb5\x2f\xfd").match, "zstd"),
                      (re.compile(rb"\x04\x22\x4d\x18").match, "lz4"),
                      (re.compile(rb"PK\x03\x04").match, "zip"))


def _is_arc(stream: BinaryIO, gz: bool) -> bool:
    """Whether the stream (its first gzip member's data when `gz`) starts as an ARC file."""
    stream.seek(0)
    head = stream.read(4096)
    if gz:
        try:
            head = zlib.decompressobj(31).decompress(head, 16)
        except zlib.error:
            return False
    return head.startswith(b"filedesc://")


def other_compression(head: bytes) -> Optional[str]:
    """The name of the compression `head` (a file's first bytes) starts with, if it is one the
    readers cannot read (bzip2, xz, zstd, lz4, zip), else None."""
    for match, name in _OTHER_COMPRESSION:
        if match(head):
            return name
    return None


def _find_next(stream: BinaryIO, start: int, magic: bytes) -> Optional[int]:
    """Absolute position of the next `magic` at or after `start`, or None at EOF. Reads 64 KB,
    then twice as much each time up to 1 MB: most hits are near (the next member)."""
    stream.seek(start)
    pos = start
    tail = b""
    size = 1 << 16
    while True:
        chunk = stream.read(size)
        size = min(2 * size, _SCAN_CHUNK)
        if not chunk:
            return None
        data = tail + chunk
        i = data.find(magic)
        if i >= 0:
            return pos - len(tail) + i
        tail = data[-(len(magic) - 1):]
        pos += len(chunk)


def _next_record_member(stream: BinaryIO, start: int) -> Optional[int]:
    """Position of the next gzip member at or after `start` that starts a WARC record, or None.

    FastWARC ends a file without a word at an empty gzip member (`gzip.compress(b"")`, 20
    bytes: valid gzip, as `cat a.gz empty.gz b.gz` makes), so every record after it would be
    lost. Each gzip magic found is inflated a little: a false hit in compressed data fails at
    once, an empty member is stepped over, a member of record data that continues the last
    record (not `WARC/`) is passed by."""
    pos = start
    while True:
        m = _find_next(stream, pos, GZIP_MAGIC)
        if m is None:
            return None
        stream.seek(m)
        d = zlib.decompressobj(31)
        out = b""
        consumed = 0
        try:
            while not out and not d.eof:
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                out = d.decompress(chunk, 64)
                consumed += len(chunk)
        except zlib.error:
            pos = m + 1  # not a member start
            continue
        if out:
            if out.lstrip(b"\r\n\t ").startswith(WARC_MAGIC[:5]):
                return m
            pos = m + 1
        elif d.eof:  # an empty member: the next one starts where it ends
            pos = m + consumed - len(d.unused_data)
        else:
            return None  # the file ends inside this member


def _exact_reader(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """read(n) that returns n bytes unless the stream ends (warcio's readers return short reads)."""
    def read_exact(n: int) -> bytes:
        data = read(n)
        if len(data) >= n or not data:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)
    return read_exact


def _read_block(read: Callable[[int], bytes], record: RawRecord, wants_body: WantsBody,
                max_bytes: int, exact: bool = True) -> None:
    """Fill record.block: the head first, the rest only if wanted (and at most max_bytes)."""
    if exact:
        read = _exact_reader(read)
    want = min(record.content_length, HEAD_BYTES)
    head = read(want) if want > 0 else b""
    record.block = head
    if len(head) < want:
        record.truncated = True
        return
    if record.content_length <= len(head):
        record.complete = True
        return
    if not wants_body(record):
        return
    limit = min(record.content_length, max_bytes) - len(head)
    parts = [head]
    got = len(head)
    while limit > 0:
        chunk = read(min(limit, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
        limit -= len(chunk)
    record.block = b"".join(parts)
    if got < min(record.content_length, max_bytes):
        record.truncated = True
    else:
        record.complete = got >= record.content_length


def _content_length(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ExtractError("bad_warc_header", f"Content-Length {text[:40]!r}") from None
    if value < 0:
        raise ExtractError("bad_warc_header", f"Content-Length {value}")
    return value


def _fastwarc_record_names() -> dict[int, str]:
    from fastwarc.warc import WarcRecordType

    return {int(getattr(WarcRecordType, name)): name for name in (
        "warcinfo", "response", "resource", "request", "metadata", "revisit", "conversion",
        "continuation")}


# A skip larger than this between the end of one record and the start of the next is reported.
# (Hand-written WARCs have Content-Lengths off by a few bytes, which readers tolerate; any
# whole record header is longer.)
GAP_TOLERANCE = 32


_WARC_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}").fullmatch


def _fastwarc_records(stream: BinaryIO, wants_body: WantsBody, max_bytes: int,
                      state: Optional[dict] = None) -> Iterator[Union[RawRecord, ReadFailure]]:
    from fastwarc.warc import ArchiveIterator

    # The record type, length and offset are C properties (no header-map look-up); FastWARC
    # reads whole blocks, so its reader needs no short-read loop.
    type_names = _fastwarc_record_names()
    last = None
    plain = state is not None and state["plain"]
    max_length = state["max_length"] if state is not None else 1 << 62
    for rec in ArchiveIterator(stream, parse_http=False):
        headers = rec.headers
        length = rec.content_length
        wtype = type_names.get(int(rec.record_type))
        if wtype is None:  # a type FastWARC does not know, or none at all
            wtype = headers.get("WARC-Type")
            if wtype is not None and not _WARC_TYPE(wtype):
                # an LF-only header reads as one WARC-Type line; a damaged one holds junk
                raise ExtractError("bad_warc_header", f"unreadable WARC-Type {wtype[:40]!r} at "
                                                      f"{rec.stream_pos}")
        if wtype is None or (length == 0 and headers.get("Content-Length") is None):
            raise ExtractError("bad_warc_header", f"malformed or truncated WARC header at "
                               f"{rec.stream_pos}: {dict(headers.to_dict())!r:.200}")
        if length > max_length:
            raise ExtractError("truncated", f"Content-Length {length} at {rec.stream_pos} runs "
                                            f"past the end of the file")
        if plain:
            # FastWARC skips what it cannot use (the rest of a block after a Content-Length too
            # small, junk between records) without a word: in an uncompressed file the next
            # record must start where the last one ended. `state["next"]` is that position,
            # where the caller reports a record the reader stopped at.
            pos = rec.stream_pos
            expected = state.get("next")
            if expected is not None and last is not None and pos - expected > GAP_TOLERANCE:
                yield ReadFailure(last, f"bad_warc_header: {pos - expected} bytes after the block "
                                        f"of the record at {last} skipped (Content-Length too "
                                        f"small?) before the record at {pos}")
            last = pos
            state["next"] = (pos + len(headers.status_line) + 4 + length + 4
                             + sum(len(k) + len(v) + 4 for k, v in headers.astuples()))
        if length <= HEAD_BYTES:  # most records: one read, no wants_body call
            block = rec.reader.read(length) if length else b""
            short = len(block) < length
            yield RawRecord(rec.stream_pos, wtype, None, None, None, length, block, not short,
                            short, headers)
            continue
        raw = RawRecord(rec.stream_pos, wtype, None, None, None, length, b"", False, False, headers)
        _read_block(rec.reader.read, raw, wants_body, max_bytes, exact=False)
        yield raw
    if state is not None and state["plain"] and state.get("next") is not None:
        end = stream.seek(0, 2)
        if end - state["next"] > GAP_TOLERANCE:
            yield ReadFailure(state["next"], f"bad_warc_header: {end - state['next']} bytes the "
                                             f"reader skipped at the end of the file")


def _warcio_records(stream: BinaryIO, wants_body: WantsBody, max_bytes: int,
                    state: Optional[dict] = None) -> Iterator[RawRecord]:
    from warcio.archiveiterator import ArchiveIterator

    start = stream.tell()
    # (arc2warc: an ARC file's records come as WARC records; a WARC's are left as they are)
    it = ArchiveIterator(stream, no_record_parse=True, check_digests=False, arc2warc=True)
    for rec in it:
        h = rec.rec_headers
        length_text = h.get_header("Content-Length")
        if length_text is not None and state is not None and \
                _content_length(length_text) > state["max_length"]:
            raise ExtractError("truncated", f"Content-Length {length_text.strip()[:20]} runs past "
                                            f"the end of the file")
        wtype = rec.rec_type
        if wtype is not None and not _WARC_TYPE(wtype):
            raise ExtractError("bad_warc_header", f"unreadable WARC-Type {wtype[:40]!r}")
        if length_text is None or wtype is None:
            raise ExtractError("bad_warc_header", "malformed or truncated WARC header")
        length = _content_length(length_text)
        if rec.length is not None and 0 <= rec.length < length:
            length = rec.length  # an ARC record's: its header lines were counted in its length
        raw = RawRecord(
            offset=-1, warc_type=wtype,
            target_uri=clean_target_uri(h.get_header("WARC-Target-URI")), date=h.get_header("WARC-Date"),
            content_type=h.get_header("Content-Type"), content_length=length,
            block=b"", complete=False, truncated=False, digest=h.get_header("WARC-Block-Digest"),
        )
        _read_block(rec.raw_stream.read, raw, wants_body, max_bytes)
        # (asking warcio for the offset before the block is read empties the record's stream)
        raw.offset = start + it.get_record_offset()
        yield raw


def iter_records(stream: BinaryIO, *, reader: str = "fastwarc",
                 wants_body: WantsBody = lambda r: True,
                 max_bytes: int = 50_000_000,
                 verify_digests: bool = False,
                 max_failures: int = 10_000) -> Iterator[Union[RawRecord, ReadFailure]]:
    """`_iter_records`, giving up on a file after `max_failures` unreadable spots: one last
    `too_many_failures` failure, and the rest of the file is not read.

    Each spot restarts the reader after a scan for the next gzip magic (or `WARC/1.`), so a
    file crafted with a magic every 4 bytes cost one failure row and ~50 µs (FastWARC; warcio
    grows with the file) per 4 bytes: a 1 GB one, 250 M rows and hours."""
    failures = 0
    for item in _iter_records(stream, reader=reader, wants_body=wants_body, max_bytes=max_bytes,
                              verify_digests=verify_digests):
        if item.__class__ is ReadFailure:
            failures += 1
            if failures > max_failures:
                yield ReadFailure(item.offset, f"too_many_failures: over {max_failures} unreadable "
                                               f"spots (extract.max_read_failures); the file is not "
                                               f"read past {item.offset}")
                return
        yield item


def _iter_records(stream: BinaryIO, *, reader: str = "fastwarc",
                  wants_body: WantsBody = lambda r: True,
                  max_bytes: int = 50_000_000,
                  verify_digests: bool = False) -> Iterator[Union[RawRecord, ReadFailure]]:
    """Every readable record of a WARC/WAT stream, with a ReadFailure for each unreadable spot.

    A complete block that holds a WARC record header after a line break (`\r\nWARC/1.`: its
    Content-Length was too large and it swallowed the records after it) is checked against its
    WARC-Block-Digest; on a mismatch (or on any mismatch with `verify_digests`) it becomes a
    `digest_mismatch` failure and reading resumes at the next record boundary after its start, so
    the swallowed records are read. (Hashing every block costs ~25 % of the WARC path on a
    loaded core, so by default only suspect blocks are hashed.)"""
    if reader not in ("fastwarc", "warcio"):
        raise ValueError(f"extract.warc_reader must be fastwarc or warcio, got {reader!r}")
    size = stream.seek(0, 2)
    stream.seek(0)
    first = stream.read(3)
    if reader == "fastwarc" and _is_arc(stream, first == GZIP_MAGIC):
        reader = "warcio"  # FastWARC reads no ARC (the Internet Archive's pre-WARC format)
        log.info("an ARC file: read with warcio")
    stream.seek(3)
    read_records = _fastwarc_records if reader == "fastwarc" else _warcio_records
    if first != GZIP_MAGIC and first != WARC_MAGIC[:3]:
        stream.seek(0)
        other = other_compression(stream.read(10))
        if other is not None:
            # (scanning it for gzip magic or `WARC/1.` would only find chance bytes)
            yield ReadFailure(0, f"unsupported_compression: a {other}-compressed file; only plain "
                                 f"and gzip WARC/WAT files are read (recompress it with gzip)")
            return
    magic = GZIP_MAGIC if first == GZIP_MAGIC else WARC_MAGIC
    if magic is WARC_MAGIC and first != WARC_MAGIC[:3]:
        # leading junk: the first gzip member, else the first record header, whichever is first
        gz, warc = _find_next(stream, 0, GZIP_MAGIC), _find_next(stream, 0, WARC_MAGIC)
        if gz is not None and (warc is None or gz < warc):
            magic = GZIP_MAGIC
    pos = 0
    while True:
        stream.seek(pos)
        last_start: Optional[int] = None
        error: Optional[str] = None
        # A Content-Length over what the file can hold (its size; 1000× it gzipped) is a lie
        # that would swallow every later record; and where the next record should start
        # (uncompressed files, FastWARC): see _fastwarc_records.
        plain = magic is WARC_MAGIC
        state: Optional[dict] = {"plain": plain and reader == "fastwarc",
                                 "max_length": size if plain else 1000 * size + (1 << 20)}
        try:
            for raw in read_records(stream, wants_body, max_bytes, state):
                if raw.__class__ is ReadFailure:
                    yield raw
                    continue
                last_start = raw.offset
                if raw.truncated:
                    # (a Content-Length too large swallows every later record: look for them)
                    error = (f"truncated: Content-Length {raw.content_length}, stream ended "
                             f"first")
                    break
                if verify_digests or holds_record_header(raw.block):
                    digest = raw.block_digest
                    if (digest is None or not raw.complete) and not verify_digests:
                        # nothing to check against: a record header after a line break in a
                        # block is taken as a Content-Length too large
                        error = (f"bad_warc_header: the {raw.warc_type} block holds a record "
                                 f"header at +{raw.block.find(_SWALLOWED) + 2} (Content-Length "
                                 f"{raw.content_length} too large?)")
                        break
                    if not block_digest_ok(raw, digest):
                        error = (f"digest_mismatch: {raw.warc_type} record, Content-Length "
                                 f"{raw.content_length}, WARC-Block-Digest {digest}")
                        break
                yield raw
            if error is None:
                if magic is not GZIP_MAGIC or reader != "fastwarc":
                    return
                # FastWARC may have stopped at an empty gzip member (see _next_record_member;
                # warcio steps over them, and reports a record's offset as the empty member's)
                nxt = _next_record_member(stream, (pos if last_start is None else last_start) + 1)
                if nxt is None:
                    return
                log.info("gzip member at %d not reached by the reader (an empty member before "
                         "it?): reading on from there", nxt)
                pos = nxt
                continue
        except GeneratorExit:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader error becomes a failure row
            error = error_text(exc)[:500]
        if last_start is None:
            # Nothing readable from `pos`: the bad spot is here.
            if pos == 0 and magic is WARC_MAGIC and first != WARC_MAGIC[:3]:
                stream.seek(0)
                code, _, detail = error.partition(":")
                error = f"{code}: not a WARC record at 0 (the file starts with {stream.read(24)!r}):" \
                        f"{detail}"[:500]
            yield ReadFailure(pos, error)
            search_from = pos + 1
        else:
            resync = error.startswith(("digest_mismatch", "truncated", "bad_warc_header: the "))
            expected = state.get("next")
            if resync:
                yield ReadFailure(last_start, error)
                search_from = last_start + 1
            elif expected is not None and expected > last_start:
                # The reader stopped at the record after the last good one: report it there
                # (its `WARC/1.` may be intact, so look for the next boundary past it).
                yield ReadFailure(expected, error)
                resync = True
                search_from = expected + 1
            else:
                search_from = last_start + 1
        nxt = _find_next(stream, search_from, magic)
        if nxt is None:
            if last_start is not None and not resync:
                # The bad spot is past the last good record and no record starts after it.
                yield ReadFailure(last_start, f"{error.split(':', 1)[0]}: after the record at "
                                              f"{last_start}: {error}")
            return
        pos = nxt
