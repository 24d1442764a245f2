"""Hostile archives and pages found by attacking the extract stage again (session 5): each test
was written failing first; the normal records around the bad spot must still give their rows."""
from __future__ import annotations

import gzip

import pytest

from laion_spark.config import ExtractConfig
from test_extract_limits import GOOD_PAGE, READERS, cands, rows, warc_bytes

PAGES = [(f"http://ex.com/p{i}", GOOD_PAGE.replace(b"good.jpg", b"g%d.jpg" % i),
          (("Content-Type", "text/html"),), None) for i in range(3)]
EXPECTED = {(f"http://ex.com/g{i}.jpg", "the good picture after it") for i in range(3)}
EMPTY_MEMBER = gzip.compress(b"")  # 20 bytes of valid gzip holding nothing


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("where", ["start", "middle", "two_in_a_row", "end"])
def test_empty_gzip_member_loses_no_record(tmp_path, reader, where):
    """FastWARC ended the file at an empty gzip member without a failure: the records after it
    were silently lost. `cat a.warc.gz empty.gz b.warc.gz` is valid gzip."""
    data, offsets = warc_bytes(PAGES, gz=True)
    cut = {"start": [0], "middle": [offsets[1]], "two_in_a_row": [offsets[2], offsets[2]],
           "end": [len(data)]}[where]
    out, shift, last = b"", 0, 0
    for at in cut:
        out += data[last:at] + EMPTY_MEMBER
        last = at
    out += data[last:]
    got = rows(tmp_path, out, ExtractConfig(warc_reader=reader), name="t.warc.gz")
    assert cands(got) == EXPECTED
    assert got["failure"] == [] and got["file"][0]["n_records"] == 3
    # FastWARC's offsets are the records' own members; warcio's the empty member before one
    # (reading from there gives the record too)
    by_url = {r["url"]: r["record_offset"] for r in got["candidate"]}
    own = [o + len(EMPTY_MEMBER) * sum(at <= o for at in cut) for o in offsets]
    first = [o + len(EMPTY_MEMBER) * sum(at < o for at in cut) for o in offsets]
    assert [by_url[f"http://ex.com/g{i}.jpg"] for i in range(3)] == (own if reader == "fastwarc" else first)

