"""Hostile records (issue 12): each becomes a failure row with a stable code, or is read right,
and the normal record after it still gives its rows."""
from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import brotli
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from laion_spark.config import ExtractConfig
from laion_spark.extract.extractor import (_dechunk, clean_text, decode_http_body, extract_file_table,
                                           parse_wat_page, parse_wat_page_fast, split_http_response)
from laion_spark.extract.html import choose_image_ref, extract_images, extract_images_reference, html_nesting
from laion_spark.extract.rules import normalise_text

READERS = ["fastwarc", "warcio"]
GOOD_PAGE = b"<html><body><img src='/good.jpg' alt='the good picture after it'></body></html>"
GOOD = ("http://ex.com/good.jpg", "the good picture after it")


def _http(body: bytes, headers=(("Content-Type", "text/html"),), status="200 OK") -> StatusAndHeaders:
    return StatusAndHeaders(status, list(headers), protocol="HTTP/1.1")


def warc_bytes(records: list, gz: bool = False) -> tuple[bytes, list[int]]:
    """A WARC of (url, body, http headers | None for a raw block, warc headers) responses;
    returns the bytes and each record's offset."""
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gz)
    offsets = []
    for url, body, http_headers, warc_headers in records:
        offsets.append(buf.tell())
        if http_headers is None:  # the block as given (an HTTP message written by hand)
            rec = writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                            warc_headers_dict={"Content-Type": "application/http; msgtype=response",
                                                               "WARC-Date": "2024-05-01T10:00:00Z",
                                                               **(warc_headers or {})})
        else:
            rec = writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                            http_headers=_http(body, http_headers),
                                            warc_headers_dict={"WARC-Date": "2024-05-01T10:00:00Z",
                                                               **(warc_headers or {})})
        writer.write_record(rec)
    return buf.getvalue(), offsets


def rows(tmp_path: Path, data: bytes, cfg: ExtractConfig | None = None, name="t.warc") -> dict:
    path = tmp_path / name
    path.write_bytes(data)
    out: dict = {"candidate": [], "failure": [], "file": []}
    for row in extract_file_table(str(path), cfg or ExtractConfig()).to_pylist():
        out[row["kind"]].append(row)
    return out


def cands(got) -> set:
    return {(r["url"], r["text"]) for r in got["candidate"]}


def codes(got) -> list[tuple[int, str]]:
    return [(r["record_offset"], r["error"].split(":", 1)[0]) for r in got["failure"]]


def with_good(tmp_path, bad_record, cfg=None, gz=False, http_headers=(("Content-Type", "text/html"),)):
    data, offsets = warc_bytes([bad_record, ("http://ex.com/p2", GOOD_PAGE, http_headers, None)], gz=gz)
    got = rows(tmp_path, data, cfg, name="t.warc.gz" if gz else "t.warc")
    assert GOOD in cands(got), got["failure"]  # the normal record after it is still extracted
    return got, offsets


# ----------------------------------------------------------------------------- bodies
def test_dechunk_negative_and_garbage_sizes_end_bounded():
    body = b"5\r\nhello\r\n-6\r\n" + b"x" * 1000
    started = time.perf_counter()
    out, cut = _dechunk(body, 1 << 20)
    assert out == b"hello" and not cut and time.perf_counter() - started < 0.1
    assert _dechunk(b"zz\r\nnot chunked", 100) == (b"zz\r\nnot chunked", False)
    assert _dechunk(b"ffffffff\r\nabc", 100) == (b"abc", False)  # a size past the end
    assert _dechunk(b"3\nabc\n3\ndef\n0\n\n", 100) == (b"abcdef", False)  # bare LF lines
    assert _dechunk(b"a\r\n0123456789\r\n0\r\n\r\n", 4) == (b"0123", True)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_decompression_is_capped_by_output_size(encoding):
    bomb = b"<html>" + b" " * 50_000_000
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[encoding](bomb)
    assert len(packed) < 200_000
    out, cut = decode_http_body({"content-encoding": encoding}, packed, 1_000_000)
    assert cut and len(out) == 1_000_000 and out.startswith(b"<html>")
    small, cut = decode_http_body({"content-encoding": encoding}, packed[: len(packed) // 2] if encoding != "br"
                                  else brotli.compress(b"<p>ok</p>"), 1_000_000)
    assert small.startswith(b"<") and len(small) <= 1_000_000


def test_gzip_bomb_page_is_cut_and_counted(tmp_path):
    page = b"<html><body><img src='/a.jpg' alt='first image on the page'>" + b"<p>x</p>" * 2_000_000
    bomb = gzip.compress(page)
    got, _ = with_good(tmp_path, ("http://ex.com/p1", bomb, (("Content-Type", "text/html"),
                                                            ("Content-Encoding", "gzip")), None),
                       ExtractConfig(max_html_bytes=1_000_000))
    assert ("http://ex.com/a.jpg", "first image on the page") in cands(got)
    assert json.loads(got["file"][0]["drops"])["html_cut"] == 1


def test_http_header_ends_at_the_first_blank_line_of_either_form():
    html = b"<html>\r\n\r\n<img src=x alt=y></html>"
    block = b"HTTP/1.0 200 OK\nContent-Type: text/html\n\n" + html
    status, headers, start = split_http_response(block)
    assert status == 200 and headers == {"content-type": "text/html"} and block[start:] == html
    block = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>\n\n</p>"
    assert block[split_http_response(block)[2]:] == b"<p>\n\n</p>"


@pytest.mark.parametrize("reader", READERS)
def test_lf_only_http_headers_lose_no_pairs(tmp_path, reader):
    body = (b"HTTP/1.0 200 OK\nContent-Type: text/html\n\n<html><body>\r\n\r\n"
            b"<img src='/old.jpg' alt='an old server page'></body></html>")
    got, _ = with_good(tmp_path, ("http://ex.com/p1", body, None, None), ExtractConfig(warc_reader=reader))
    assert ("http://ex.com/old.jpg", "an old server page") in cands(got) and not got["failure"]


# ----------------------------------------------------------------------------- HTML depth
@pytest.mark.parametrize("page", [b"<body>" + b"<div>" * 200_000 + b"<img src=/a.jpg alt='deep deep image'>",
                                  b"<body>" + b"<ul>" * 8000 + b"<div></div>" * 100_000])
def test_deep_nesting_is_too_deep_before_lexbor_sees_it(tmp_path, page):
    started = time.perf_counter()
    got, offsets = with_good(tmp_path, ("http://ex.com/p1", page, (("Content-Type", "text/html"),), None))
    assert codes(got) == [(offsets[0], "too_deep")]
    assert time.perf_counter() - started < 20  # lexbor alone: minutes on the first page


def test_nesting_estimate_is_not_fooled_by_stray_or_scripted_end_tags():
    hidden = b"<div>" * 3000 + b"<script>" + b"</div>" * 3000 + b"</script>" + b"<div>" * 3000
    assert "depth" in html_nesting(hidden, 4096, 10**12)
    stray = b"<span>" * 3000 + b"</b>" * 3000 + b"<div>" * 3000
    assert "depth" in html_nesting(stray, 4096, 10**12)
    normal = b"<div><p>" * 2000 + b"</p></div>" * 2000 + b"<img><br>" * 5000
    assert html_nesting(normal, 4096, 10**12) is None


# ----------------------------------------------------------------------------- strings
def test_lone_surrogate_base_in_wat_is_a_failure_row_not_a_segfault(tmp_path):
    """The issue's signal-11 record, run in a subprocess so a crash is seen as one."""
    doc = (b'{"Envelope":{"WARC-Header-Metadata":{"WARC-Target-URI":"http://x/p","WARC-Date":"2024-01-01T00:00:00Z"},'
           b'"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Head":{"Base":"http://x/\\ud800/"},'
           b'"Links":[{"path":"IMG@/src","url":"rel.jpg","alt":"a relative image here"}]}}}}}')
    good = doc.replace(b"\\ud800", b"ok")
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=False)
    for d in (doc, good):
        writer.write_record(writer.create_warc_record("http://x/p", "metadata", payload=io.BytesIO(d),
                                                      warc_content_type="application/json"))
    path = tmp_path / "s.wat"
    path.write_bytes(buf.getvalue())
    code = ("import json,sys; from laion_spark.config import ExtractConfig;"
            "from laion_spark.extract.extractor import extract_file_table as t;"
            f"print(json.dumps(t({str(path)!r}, ExtractConfig()).to_pylist(), default=str))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [r["error"].split(":")[0] for r in out if r["kind"] == "failure"] == ["bad_json"]
    assert [(r["url"], r["text"]) for r in out if r["kind"] == "candidate"] == \
        [("http://x/ok/rel.jpg", "a relative image here")]


def test_control_characters_and_nul_never_reach_the_c_extensions(tmp_path):
    page = ("<html><body><img src='/a\x01b.jpg' alt='nul \x00 and bell \x07 in alt'>"
            "<img src='/tab\t.jpg' alt='a tab inside the url'></body></html>").encode()
    got, _ = with_good(tmp_path, ("http://ex.com/p1", page, (("Content-Type", "text/html"),), None))
    texts = {t for _, t in cands(got)}
    assert "a tab inside the url" in texts
    for _, text in cands(got):
        assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]", text)
    assert all("\x01" not in u and "\t" not in u for u, _ in cands(got))


def test_alt_text_is_ftfy_fixed_then_whitespace_normalised(tmp_path):
    page = ("<html><head><meta charset='utf-8'></head><body>"
            "<img src='/m.jpg' alt='cafÃ©   au  lait'>"  # UTF-8 read as Latin-1: mojibake
            "<img src='/q.jpg' alt='Don’t  miss\nit'></body></html>").encode()
    got, _ = with_good(tmp_path, ("http://ex.com/p1", page, (("Content-Type", "text/html; charset=utf-8"),), None))
    assert {"café au lait", "Don't miss it"} <= {t for _, t in cands(got)}


def test_ascii_shortcut_equals_ftfy():
    """clean_text skips ftfy on ASCII without & or ESC: the result is the same after normalisation."""
    import random

    import ftfy

    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0, 128) if chr(c) not in "&\x1b"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert normalise_text(clean_text(s)) == normalise_text(
            re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", ftfy.fix_text(s))), repr(s)


def test_meta_legacy_charset_on_utf8_bytes_is_counted(tmp_path):
    page = ("<html><head><meta charset='windows-1252'></head><body>"
            "<img src='/c.jpg' alt='crème brûlée dessert'></body></html>").encode("utf-8")
    got, _ = with_good(tmp_path, ("http://ex.com/p1", page, (("Content-Type", "text/html"),), None))
    # decoded as the browser does (windows-1252), the mojibake then repaired by ftfy
    assert ("http://ex.com/c.jpg", "crème brûlée dessert") in cands(got)
    assert json.loads(got["file"][0]["drops"])["meta_charset_on_utf8"] == 1


# ----------------------------------------------------------------------------- lazy loading
def test_lazy_attribute_holding_json_is_not_a_url():
    attrs = {"data-src": '{"default":"//img.ex.com/a.jpg","mobile":"//img.ex.com/m.jpg"}', "src": "/real.jpg"}
    assert choose_image_ref(attrs) == ("/real.jpg", "src")
    assert choose_image_ref({"data-src": "a.jpg 1x, b.jpg 2x", "src": "p.gif"}) == ("b.jpg", "data-src")
    assert choose_image_ref({"data-src": "  /lazy.jpg ", "src": "p.gif"}) == ("/lazy.jpg", "data-src")


def test_picture_source_largest_candidate():
    html = ("<picture><source type='image/webp' srcset='/s.webp 320w, /l.webp 1600w'>"
            "<img src='/fallback.jpg' alt='picture element image'></picture>"
            "<picture><source srcset='/same.webp'><img src='/keep.jpg' alt='a tie keeps the img'></picture>")
    got = [(i.ref, i.source) for i in extract_images(html).images]
    assert got == [("/l.webp", "picture"), ("/keep.jpg", "src")]
    assert [(i.ref, i.source) for i in extract_images_reference(html).images] == got


# ----------------------------------------------------------------------------- WAT
def _wat(links_json: bytes, head=b'{"Title":"t"}', extra=b"") -> bytes:
    return (b'{"Envelope":{"WARC-Header-Metadata":{"WARC-Target-URI":"http://x/p"},'
            b'"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Head":' + head +
            b',"Links":' + links_json + extra + b'}}}}}')


@pytest.mark.parametrize("doc", [
    # duplicate keys: the last Links / Head / Base counts
    _wat(b'[{"path":"IMG@/src","url":"a.jpg","alt":"first links array"}]',
         extra=b',"Links":[{"path":"IMG@/src","url":"b.jpg","alt":"second links array"}]'),
    _wat(b'[{"path":"IMG@/src","url":"a.jpg","alt":"x"}]', head=b'{"Base":"http://one/","Base":"http://two/"}'),
    # IMG@/src objects outside Links (Head's Link array, after the array, nested in a link)
    _wat(b'[{"path":"A@/href","url":"h"}]', head=b'{"Link":[{"path":"IMG@/src","url":"in-head.jpg","alt":"h"}]}'),
    _wat(b'[{"path":"A@/href","url":"h"}]', extra=b',"Other":[{"path":"IMG@/src","url":"after.jpg","alt":"z"}]'),
    _wat(b'[{"path":"A@/href","x":[{"path":"IMG@/src","url":"nested.jpg","alt":"n"}]}]'),
    _wat(b'[[{"path":"IMG@/src","url":"in-inner-array.jpg","alt":"n"}]]'),
    # an escaped slash is the same string
    _wat(b'[{"path":"IMG@\\/src","url":"escaped.jpg","alt":"e"}]'),
    _wat(b'[{"path":"IMG@/src","url":"q.jpg","alt":"\\"}]\\""},{"path":"IMG@/src","url":"r.jpg","alt":"s"}]'),
])
def test_fast_wat_path_equals_the_full_parse_or_defers(doc):
    full = parse_wat_page(doc)
    fast = parse_wat_page_fast(doc)
    assert fast is None or fast == full


def test_wat_json_too_large_and_too_deep(tmp_path):
    big = _wat(b'[{"path":"IMG@/src","url":"a.jpg","alt":"' + b"x" * 6000 + b'"}]')
    deep = _wat(b"[" * 1500 + b'{"path":"IMG@/src","url":"d.jpg","alt":"deep"}' + b"]" * 1500)
    good = _wat(b'[{"path":"IMG@/src","url":"/g.jpg","alt":"the good wat image"}]')
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=False)
    offsets = []
    for d in (big, deep, good):
        offsets.append(buf.tell())
        writer.write_record(writer.create_warc_record("http://x/p", "metadata", payload=io.BytesIO(d),
                                                      warc_content_type="application/json"))
    got = rows(tmp_path, buf.getvalue(), ExtractConfig(max_wat_json_bytes=5000), name="w.wat")
    assert codes(got) == [(offsets[0], "too_large"), (offsets[1], "too_deep")]
    assert cands(got) == {("http://x/g.jpg", "the good wat image")}


# ----------------------------------------------------------------------------- dates
@pytest.mark.parametrize("date", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59Z", "not a date"])
def test_fetch_time_out_of_range_is_null_with_a_note(tmp_path, date):
    page = b"<html><body><img src='/d.jpg' alt='a page with a bad date'></body></html>"
    got, offsets = with_good(tmp_path, ("http://ex.com/p1", page, (("Content-Type", "text/html"),),
                                        {"WARC-Date": date}))
    bad = [r for r in got["candidate"] if r["text"] == "a page with a bad date"]
    assert len(bad) == 1 and bad[0]["fetch_time"] is None
    assert codes(got) == [(offsets[0], "bad_date")]
    assert all(r["fetch_time"] is not None for r in got["candidate"] if r["text"] != "a page with a bad date")


# ----------------------------------------------------------------------------- WARC damage
def _four_pages() -> tuple[bytes, list[int]]:
    return warc_bytes([(f"http://ex.com/p{i}", f"<html><body><img src='/i{i}.jpg' alt='picture number {i}'>"
                        f"</body></html>".encode(), (("Content-Type", "text/html"),), None) for i in range(4)])


def _mutate(name: str, d: bytes, offsets: list[int]) -> bytes:
    s2 = offsets[1]
    head_end = d.find(b"\r\n\r\n", s2)
    m = re.search(rb"Content-Length: (\d+)\r\n", d[s2:head_end + 2])
    n, a, b = int(m.group(1)), s2 + m.start(1), s2 + m.end(1)
    return {
        "leading_junk": b"junk\r\n\r\n" + d,
        "length_too_large": d[:a] + str(n * 3).encode() + d[b:],
        "length_past_the_end": d[:a] + b"99999999" + d[b:],
        "length_zero": d[:a] + b"0" + d[b:],
        "length_halved": d[:a] + str(n // 2).encode() + d[b:],
        "length_negative": d[:a] + b"-5" + d[b:],
        "version_9_9": d[:s2] + b"WARC/9.9" + d[s2 + 8:],
        "lf_only_header": d[:s2] + d[s2:head_end].replace(b"\r\n", b"\n") + b"\n\n" + d[head_end + 4:],
        "unreadable_type": d[:s2] + d[s2:].replace(b"WARC-Type: response", b"WARC-Type: r\xffsp", 1),
        "no_type": d[:s2] + d[s2:].replace(b"WARC-Type: response\r\n", b"", 1),
    }[name]


@pytest.mark.parametrize("name", ["leading_junk", "length_too_large", "length_past_the_end", "length_zero",
                                  "length_halved", "length_negative", "version_9_9", "lf_only_header",
                                  "unreadable_type", "no_type"])
def test_damaged_warc_header_gives_a_failure_row_and_every_good_record(tmp_path, name):
    """The second of four records damaged: a failure row near it with a stable code, and the
    other three records' rows (FastWARC, the default reader, on an uncompressed file)."""
    data, offsets = _four_pages()
    got = rows(tmp_path, _mutate(name, data, offsets))
    texts = {t for _, t in cands(got)}
    assert {"picture number 0", "picture number 2", "picture number 3"} <= texts, got["failure"]
    assert got["failure"], "a damaged record must leave a failure row"
    codes_seen = {c for _, c in codes(got)}
    assert codes_seen <= {"bad_warc_header", "digest_mismatch", "truncated", "bad_http"}
    if name != "leading_junk":
        assert "picture number 1" in texts or any(offsets[1] <= o < offsets[2] for o, _ in codes(got))


@pytest.mark.parametrize("name", ["leading_junk", "length_too_large", "length_past_the_end"])
def test_damaged_gzip_warc_resyncs_on_the_next_member(tmp_path, name):
    data, offsets = warc_bytes([(f"http://ex.com/p{i}", f"<html><body><img src='/i{i}.jpg' alt='picture number {i}'>"
                                 f"</body></html>".encode(), (("Content-Type", "text/html"),), None) for i in range(4)])
    members = [gzip.compress(data[a:b]) for a, b in zip(offsets, offsets[1:] + [len(data)])]
    plain = _mutate(name, data, offsets)
    if name == "leading_junk":
        gz = b"\x00junk" + b"".join(members)
    else:  # the damaged record re-compressed as one member, as a writer with a bad length would
        shift = len(plain) - len(data)
        gz = members[0] + gzip.compress(plain[offsets[1]:offsets[2] + shift]) + b"".join(members[2:])
    got = rows(tmp_path, gz, name="t.warc.gz")
    assert {"picture number 0", "picture number 2", "picture number 3"} <= {t for _, t in cands(got)}, got["failure"]
    assert got["failure"]
