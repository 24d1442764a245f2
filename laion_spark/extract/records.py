"""Streaming WARC record reader that survives bad input.

Both FastWARC and warcio stop a file at the first corrupt gzip member or malformed header. Common
Crawl writes one gzip member per record, so after an error we look for the next member start
(gzip magic `1f 8b 08`, or `WARC/1.` in an uncompressed file) past the last good record and go on
from there: one `ReadFailure` per bad spot, every good record still read. The file is never held
in memory: records come off a seekable stream (local file or fsspec remote file).
"""
from __future__ import annotations

import logging
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
                 "_target_uri", "_date", "_content_type", "_headers")

    def __init__(self, offset: int, warc_type: str, target_uri: Optional[str], date: Optional[str],
                 content_type: Optional[str], content_length: int, block: bytes, complete: bool,
                 truncated: bool, headers: Any = None):
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

    def _resolve_headers(self) -> None:
        headers, self._headers = self._headers, None
        self._target_uri = _clean_uri(headers.get("WARC-Target-URI"))
        self._date = headers.get("WARC-Date")
        self._content_type = headers.get("Content-Type")

    def __repr__(self) -> str:
        return (f"RawRecord(offset={self.offset}, warc_type={self.warc_type!r}, "
                f"target_uri={self.target_uri!r}, content_length={self.content_length})")


@dataclass
class ReadFailure:
    """A spot of the file that could not be read (corrupt gzip, truncation, malformed header)."""

    offset: int
    error: str


# Decides, from a record with the first HEAD_BYTES of its block, whether the rest is wanted.
WantsBody = Callable[[RawRecord], bool]


def _clean_uri(uri: Optional[str]) -> Optional[str]:
    """wget writes `WARC-Target-URI: <https://...>` (a WARC 1.1 draft form); strip the brackets."""
    if uri is None:
        return None
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1].strip()
    return uri


def _find_next(stream: BinaryIO, start: int, magic: bytes) -> Optional[int]:
    """Absolute position of the next `magic` at or after `start`, or None at EOF."""
    stream.seek(start)
    pos = start
    tail = b""
    while True:
        chunk = stream.read(_SCAN_CHUNK)
        if not chunk:
            return None
        data = tail + chunk
        i = data.find(magic)
        if i >= 0:
            return pos - len(tail) + i
        tail = data[-(len(magic) - 1):]
        pos += len(chunk)


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


def _fastwarc_record_names() -> dict[int, str]:
    from fastwarc.warc import WarcRecordType

    return {int(getattr(WarcRecordType, name)): name for name in (
        "warcinfo", "response", "resource", "request", "metadata", "revisit", "conversion",
        "continuation")}


def _fastwarc_records(stream: BinaryIO, wants_body: WantsBody, max_bytes: int) -> Iterator[RawRecord]:
    from fastwarc.warc import ArchiveIterator

    # The record type, length and offset are C properties (no header-map look-up); FastWARC
    # reads whole blocks, so its reader needs no short-read loop.
    type_names = _fastwarc_record_names()
    for rec in ArchiveIterator(stream, parse_http=False):
        headers = rec.headers
        length = rec.content_length
        wtype = type_names.get(int(rec.record_type))
        if wtype is None:  # a type FastWARC does not know, or none at all
            wtype = headers.get("WARC-Type")
        if wtype is None or (length == 0 and headers.get("Content-Length") is None):
            raise ValueError(f"malformed or truncated WARC header at {rec.stream_pos}: "
                             f"{dict(headers.to_dict())!r:.200}")
        if length <= HEAD_BYTES:  # most records: one read, no wants_body call
            block = rec.reader.read(length) if length else b""
            short = len(block) < length
            yield RawRecord(rec.stream_pos, wtype, None, None, None, length, block, not short,
                            short, headers)
            continue
        raw = RawRecord(rec.stream_pos, wtype, None, None, None, length, b"", False, False, headers)
        _read_block(rec.reader.read, raw, wants_body, max_bytes, exact=False)
        yield raw


def _warcio_records(stream: BinaryIO, wants_body: WantsBody, max_bytes: int) -> Iterator[RawRecord]:
    from warcio.archiveiterator import ArchiveIterator

    start = stream.tell()
    it = ArchiveIterator(stream, no_record_parse=True, check_digests=False)
    for rec in it:
        h = rec.rec_headers
        length_text = h.get_header("Content-Length")
        wtype = rec.rec_type
        if length_text is None or wtype is None:
            raise ValueError("malformed or truncated WARC header")
        raw = RawRecord(
            offset=-1, warc_type=wtype,
            target_uri=_clean_uri(h.get_header("WARC-Target-URI")), date=h.get_header("WARC-Date"),
            content_type=h.get_header("Content-Type"), content_length=int(length_text),
            block=b"", complete=False, truncated=False,
        )
        _read_block(rec.raw_stream.read, raw, wants_body, max_bytes)
        # (asking warcio for the offset before the block is read empties the record's stream)
        raw.offset = start + it.get_record_offset()
        yield raw


def iter_records(stream: BinaryIO, *, reader: str = "fastwarc",
                 wants_body: WantsBody = lambda r: True,
                 max_bytes: int = 50_000_000) -> Iterator[Union[RawRecord, ReadFailure]]:
    """Every readable record of a WARC/WAT stream, with a ReadFailure for each unreadable spot."""
    if reader not in ("fastwarc", "warcio"):
        raise ValueError(f"extract.warc_reader must be fastwarc or warcio, got {reader!r}")
    read_records = _fastwarc_records if reader == "fastwarc" else _warcio_records
    stream.seek(0)
    first = stream.read(3)
    magic = GZIP_MAGIC if first == GZIP_MAGIC else WARC_MAGIC
    pos = 0
    while True:
        stream.seek(pos)
        last_start: Optional[int] = None
        try:
            for raw in read_records(stream, wants_body, max_bytes):
                last_start = raw.offset
                if raw.truncated:
                    yield ReadFailure(raw.offset, f"truncated record: Content-Length "
                                                  f"{raw.content_length}, stream ended first")
                    continue
                yield raw
            return
        except GeneratorExit:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader error becomes a failure row
            error = f"{type(exc).__name__}: {exc}"[:500]
        if last_start is None:
            # Nothing readable from `pos`: the bad spot is here.
            yield ReadFailure(pos, error)
            search_from = pos + 1
        else:
            search_from = last_start + 1
        nxt = _find_next(stream, search_from, magic)
        if nxt is None:
            if last_start is not None:
                # The bad spot is past the last good record and no record starts after it.
                yield ReadFailure(last_start, f"after the record at {last_start}: {error}")
            return
        pos = nxt
