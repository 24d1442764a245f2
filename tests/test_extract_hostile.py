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


# ----------------------------------------------------------------------------- a new user's inputs
@pytest.fixture()
def http_dir(tmp_path):
    """A static HTTP server on 127.0.0.1 over a folder (404 for what is not there)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_missing_inputs_are_a_clear_config_error(tmp_path, http_dir):
    """A missing path or a URL that 404s was taken as a file: its task wrote a `cannot_open` row
    and an `extract_files` row, so the run ended 0 and the file counted as done (created later,
    it would be skipped). An empty folder raised a bare ValueError (a traceback from the CLI)."""
    from laion_spark.config import ConfigError
    from laion_spark.extract.inputs import resolve_inputs

    root, base = http_dir
    (root / "ok.warc.gz").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    present = tmp_path / "a.warc.gz"
    present.write_bytes(b"")
    for bad, says in [(tmp_path / "nope.warc.gz", "no such file"),
                      (f"file://{tmp_path}/nope.warc.gz", "no such file"),
                      (f"{base}/nope.warc.gz", "not found"),
                      (tmp_path / "nope.paths.gz", "not found")]:
        with pytest.raises(ConfigError, match=says):
            resolve_inputs(ExtractConfig(inputs=[str(present), str(bad)]))
    assert resolve_inputs(ExtractConfig(inputs=[str(present), f"{base}/ok.warc.gz"])) == \
        [str(present), f"{base}/ok.warc.gz"]
    assert resolve_inputs(ExtractConfig(inputs=[str(tmp_path / "empty")])) == []
    # a crawl-like tree: `**` spans folders (it matched one level only, as `*`)
    deep = tmp_path / "crawl-data" / "CC-MAIN-2024-22" / "segments" / "1" / "warc"
    deep.mkdir(parents=True)
    (deep / "f.warc.gz").write_bytes(b"")
    assert resolve_inputs(ExtractConfig(inputs=[f"{tmp_path}/crawl-data/**/*.warc.gz"])) == \
        [str(deep / "f.warc.gz")]


def test_cli_names_the_missing_input_and_exits_2(tmp_path, caplog):
    """What a user sees: `config error: ...` and exit status 2, before any Spark session."""
    from laion_spark import cli

    with caplog.at_level("ERROR"):
        assert cli.main(["extract", "--lake", str(tmp_path / "lake"), "--input",
                         str(tmp_path / "typo.warc.gz")]) == 2
    assert "typo.warc.gz: no such file" in caplog.text
    caplog.clear()
    (tmp_path / "empty").mkdir()
    with caplog.at_level("ERROR"):
        assert cli.main(["extract", "--lake", str(tmp_path / "lake"), "--input",
                         str(tmp_path / "empty")]) == 2
    assert "no input files" in caplog.text


# ----------------------------------------------------------------------------- charsets
def _page(tmp_path, body: bytes, content_type="text/html", reader="fastwarc") -> dict:
    data, _ = warc_bytes([("http://ex.com/dir/p.html", body, (("Content-Type", content_type),), None)])
    return rows(tmp_path, data, ExtractConfig(warc_reader=reader))


PICTURE = "<html><body><p>café</p><img src='a.jpg' alt='une belle image'></body></html>"
WANT = {("http://ex.com/dir/a.jpg", "une belle image")}


@pytest.mark.parametrize("label,codec", [("utf-16le", "utf-16-le"), ("UTF-16", "utf-16-le"),
                                         ("utf-16be", "utf-16-be")])
def test_utf16_named_by_the_http_header_is_decoded_as_utf16(tmp_path, label, codec):
    """The header's UTF-16 was taken as UTF-8 (a rule for <meta> only): a UTF-16 page without a
    BOM lost every image."""
    got = _page(tmp_path, PICTURE.encode(codec), f"text/html; charset={label}")
    assert cands(got) == WANT and got["failure"] == []
    # in <meta>, UTF-16 still means UTF-8 (the bytes were read as ASCII to find it)
    got = _page(tmp_path, ("<meta charset=utf-16>" + PICTURE).encode())
    assert cands(got) == WANT


@pytest.mark.parametrize("label", ["punycode", "utf-7", "unicode_escape", "raw_unicode_escape",
                                   "idna", "utf-8-sig", "utf-32", "rot13", "mbcs", "undefined"])
@pytest.mark.parametrize("where", ["meta", "header"])
def test_python_only_codecs_are_not_web_charsets(tmp_path, label, where):
    """Any label Python's codecs know was used: `charset=punycode` decoded the page as Punycode
    (no image left), `utf-7` let `+ADw-img...` smuggle markup a browser shows as text,
    `unicode_escape` turned `\\u0000` text into NUL. A browser ignores labels outside the
    WHATWG Encoding standard; so do we (UTF-8, here)."""
    smuggled = b"+ADw-img src=+ACI-/smuggled.jpg+ACI- alt=+ACI-a smuggled image+ACI-+AD4-"
    body = b"<html><body><img src='a.jpg' alt='une image \\x41\\u0042'>" + smuggled
    if where == "meta":
        got = _page(tmp_path, f"<meta charset='{label}'>".encode() + body)
    else:
        got = _page(tmp_path, body, f"text/html; charset={label}")
    assert cands(got) == {("http://ex.com/dir/a.jpg", "une image \\x41\\u0042")}
    assert got["failure"] == []


# ----------------------------------------------------------------------------- base href, title
@pytest.mark.parametrize("href", ["java\tscript:alert(1)", "\njavascript:alert(1)", "da\r\nta:text/html,x",
                                  "\x01javascript:x", " \u00a0javascript:x"])
def test_script_base_hidden_by_tab_or_controls_is_ignored(tmp_path, href):
    """`<base href="java<TAB>script:...">` is `javascript:` to the URL parser (tab, LF, CR are
    removed; leading controls stripped) but was not to our check: it became the base and every
    relative image was dropped (`scheme`). Same for a WAT `Head.Base`."""
    from laion_spark.extract.rules import resolve_base

    assert resolve_base("http://ex.com/dir/p.html", href) == "http://ex.com/dir/p.html"
    body = f"<html><head><base href='{href}'></head><img src='a.jpg' alt='une belle image'>"
    got = _page(tmp_path, body.encode())
    assert cands(got) == WANT
    # what still works as a base: surrounding whitespace, a tab inside a usable URL
    assert resolve_base("http://ex.com/p", " \thttp://b.com/\nx/ ") == "http://b.com/x/"


def test_title_is_cut_like_the_alt_text(tmp_path):
    """A 1 MB `title` attribute was kept whole in the candidate row (the alt is cut at
    max_text_length)."""
    cfg = ExtractConfig()
    body = b"<img src='a.jpg' alt='une belle image' title='" + "\u00e9t\u00e9 ".encode() * 250_000 + b"'>"
    got = _page(tmp_path, body)
    (row,) = got["candidate"]
    assert len(row["title"]) == cfg.max_text_length and row["title"].startswith("\u00e9t\u00e9 \u00e9t\u00e9")


# ----------------------------------------------------------------------------- other formats
@pytest.mark.parametrize("fmt", ["bz2", "xz", "zstd", "lz4", "zip"])
def test_other_compression_is_one_clear_failure(tmp_path, fmt):
    """A .warc.bz2 (or xz, zstd...) was 'bad_warc_header: OSError: Invalid WARC header' at 0,
    and then the whole file was scanned for gzip magic and `WARC/1.`, which compressed data
    holds by chance (each hit one more failure row). Now: one `unsupported_compression` row
    naming the format."""
    import bz2
    import io
    import lzma
    import os
    import zipfile

    plain, _ = warc_bytes(PAGES)
    noise = os.urandom(1 << 16) + b"\x1f\x8b\x08" + b"WARC/1.0\r\n"  # chance magic bytes
    if fmt == "bz2":
        data = bz2.compress(plain) + noise
    elif fmt == "xz":
        data = lzma.compress(plain) + noise
    elif fmt == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("t.warc", plain + noise)
        data = buf.getvalue()
    else:  # frame magic + junk: what the sniff sees
        data = {"zstd": b"\x28\xb5\x2f\xfd", "lz4": b"\x04\x22\x4d\x18"}[fmt] + noise
    for reader in READERS:
        got = rows(tmp_path, data, ExtractConfig(warc_reader=reader), name=f"t.warc.{fmt}")
        assert [(r["record_offset"], r["error"].split(":")[0]) for r in got["failure"]] == \
            [(0, "unsupported_compression")]
        assert {"bz2": "bzip2"}.get(fmt, fmt) in got["failure"][0]["error"]


def test_a_file_that_is_not_a_warc_says_what_it_starts_with(tmp_path):
    got = rows(tmp_path, b"<!doctype html><html><img src=a.jpg alt='not a warc at all'>", name="t.warc")
    (failure,) = got["failure"]
    assert failure["error"].startswith("bad_warc_header: not a WARC record at 0 (the file starts "
                                       "with b'<!doctype html><html><im'): ")
    # a file that starts as a WARC but whose first header is damaged is not told it is no WARC
    got = rows(tmp_path, b"WARC/1.0\r\nWARC-Type: \x00\x01\r\n\r\n" + b"x" * 100, name="t.warc")
    assert got["failure"] and all("not a WARC record" not in r["error"] for r in got["failure"])


# ----------------------------------------------------------------------------- page URL size
def _wat_record(uri: str, n_images: int) -> bytes:
    import json

    doc = {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": uri,
                                                 "WARC-Date": "2024-05-01T10:00:00Z"},
           "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": [
               {"path": "IMG@/src", "url": f"http://ex.com/{i}.jpg", "alt": f"picture number {i}"}
               for i in range(n_images)]}}}}}
    block = json.dumps(doc).encode()
    return (b"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: http://ex.com/x\r\n"
            b"WARC-Date: 2024-05-01T10:00:00Z\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(block) + block + b"\r\n\r\n")


@pytest.mark.parametrize("fmt", ["wat", "warc"])
def test_page_url_over_its_limit_is_a_failure_not_a_row_per_image(tmp_path, fmt):
    """Every candidate row repeats its page URL, which had no limit: a WAT record whose JSON
    WARC-Target-URI was 1 MB, with 3,000 image links (3 GB of page_url), made Arrow return a
    ChunkedArray and extract_file_batches raise TypeError (a crashed task). warcio reads WARC
    headers of any size (FastWARC refuses ~64 KB+). Now a page URL over max_page_url_length
    (8,192) is a `bad_url` failure row, and the record after it is read."""
    cfg = ExtractConfig(warc_reader="warcio")
    long_url = "http://ex.com/" + "a" * (cfg.max_page_url_length - 13)
    ok_url = long_url[:-1]
    if fmt == "wat":
        data = _wat_record(long_url, 10) + _wat_record(ok_url, 2)
    else:
        page = b"<img src='/a.jpg' alt='une belle image'><img src='/b.jpg' alt='une autre image'>"
        data, _ = warc_bytes([(long_url, page, (("Content-Type", "text/html"),), None),
                              (ok_url, page, (("Content-Type", "text/html"),), None)])
    got = rows(tmp_path, data, cfg, name=f"t.{fmt}")
    assert [(r["record_offset"], r["error"].split(":")[0]) for r in got["failure"]] == [(0, "bad_url")]
    assert "over max_page_url_length=8192" in got["failure"][0]["error"]
    assert len(got["candidate"]) == 2 and {r["page_url"] for r in got["candidate"]} == {ok_url}


# ----------------------------------------------------------------------------- failure amplification
def test_a_file_of_chance_magic_bytes_is_given_up_after_max_read_failures(tmp_path):
    """A gzip magic every 4 bytes: each one restarted the reader and gave one failure row (a
    crafted 1 GB file: 250 M rows, hours). Now at most max_read_failures rows, then one
    `too_many_failures` row, and the file is left (FastWARC; warcio re-reads the rest of a
    junk 'line' at every restart, so it is slow on such a file even within the limit)."""
    good, _ = warc_bytes(PAGES[:1], gz=True)
    data = good + b"\x1f\x8b\x08\x00" * 600 + good
    cfg = ExtractConfig(max_read_failures=50)
    got = rows(tmp_path, data, cfg, name="t.warc.gz")
    assert len(got["candidate"]) == 1  # the record before the junk
    assert len(got["failure"]) == 51 and got["file"][0]["n_failures"] == 51
    assert got["failure"][-1]["error"].startswith("too_many_failures: over 50 unreadable spots")
    # under the limit, every spot is still reported and the record after the junk read
    got = rows(tmp_path, data, ExtractConfig(), name="t.warc.gz")
    assert len(got["candidate"]) == 2 and len(got["failure"]) == 600


# ----------------------------------------------------------------------------- content codings
def _raw_response(http: bytes) -> bytes:
    return (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://ex.com/dir/p.html\r\n"
            b"WARC-Date: 2024-05-01T10:00:00Z\r\nContent-Type: application/http; msgtype=response\r\n"
            b"Content-Length: %d\r\n\r\n" % len(http) + http + b"\r\n\r\n")


@pytest.mark.parametrize("headers", [b"Content-Encoding: gzip, gzip\r\n",
                                     b"Content-Encoding: gzip\r\nContent-Encoding: gzip\r\n",
                                     b"Content-Encoding: identity, gzip ,gzip\r\n"])
def test_stacked_content_codings_are_undone_in_reverse(tmp_path, headers):
    """`Content-Encoding: gzip, gzip` (or the header twice) was no coding we knew: the page was
    parsed as gzip bytes, counted as an HTML page, and gave no image."""
    body = gzip.compress(gzip.compress(PICTURE.encode()))
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n" + headers + b"\r\n" + body
    got = rows(tmp_path, _raw_response(http))
    assert cands(got) == WANT and got["failure"] == []


def test_stacked_codings_stay_capped():
    from laion_spark.extract.extractor import decode_http_body

    bomb = gzip.compress(gzip.compress(b"\0" * 30_000_000))
    out, cut = decode_http_body({"content-encoding": "gzip, gzip"}, bomb, 1_000_000)
    assert len(out) == 1_000_000 and cut
    deep = PICTURE.encode()
    for _ in range(6):
        deep = gzip.compress(deep)
    out, _cut = decode_http_body({"content-encoding": ", ".join(["gzip"] * 6)}, deep, 1_000_000)
    assert out[:2] == b"\x1f\x8b"  # only the last 4 codings are undone


# ----------------------------------------------------------------------------- ARC
def _arc(gz: bool) -> bytes:
    """An ARC v1 file (the Internet Archive's format before WARC): a filedesc record, then one
    HTTP response; one gzip member per record when gz."""
    desc_body = b"1 0 InternetArchive\nURL IP-address Archive-date Content-type Archive-length\n"
    desc = b"filedesc://t.arc 0.0.0.0 20240501100000 text/plain %d\n" % len(desc_body) + desc_body + b"\n"
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + PICTURE.encode()
    rec = b"http://ex.com/dir/p.html 1.2.3.4 20240501100000 text/html %d\n" % len(http) + http + b"\n"
    return gzip.compress(desc) + gzip.compress(rec) if gz else desc + rec


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("reader", READERS)
def test_arc_files_are_read(tmp_path, reader, gz):
    """A folder's `.arc.gz` files were taken as inputs, then every record was a
    `bad_warc_header` failure (FastWARC reads no ARC; our warcio reader did not convert them).
    ARC records now come through warcio's arc2warc, whichever reader is configured."""
    from laion_spark.extract.inputs import resolve_inputs

    got = rows(tmp_path, _arc(gz), ExtractConfig(warc_reader=reader), name="t.arc.gz" if gz else "t.arc")
    assert cands(got) == WANT and got["failure"] == []
    assert got["candidate"][0]["fetch_time"].isoformat() == "2024-05-01T10:00:00+00:00"
    assert resolve_inputs(ExtractConfig(inputs=[str(tmp_path)])) == \
        [str(tmp_path / ("t.arc.gz" if gz else "t.arc"))]


@pytest.mark.parametrize("uri", ["<http://ex.com/dir/p.html>", " http://ex.com/dir/p.html\t"])
def test_wat_page_url_in_angle_brackets_is_cleaned(tmp_path, uri):
    """wget writes `WARC-Target-URI: <http://…>`; the WARC path strips the brackets, but a WAT
    made from such a WARC copies the value into its JSON, where it was used as it was: the
    page_url column held `<http://…>` and every relative image was dropped (`scheme`)."""
    import json

    doc = {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": uri,
                                                 "WARC-Date": "2024-05-01T10:00:00Z"},
           "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {"Links": [
               {"path": "IMG@/src", "url": "a.jpg", "alt": "une belle image"}]}}}}}
    block = json.dumps(doc).encode()
    data = (b"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: " + uri.encode() + b"\r\n"
            b"WARC-Date: 2024-05-01T10:00:00Z\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(block) + block + b"\r\n\r\n")
    got = rows(tmp_path, data, name="t.wat")
    assert cands(got) == WANT and got["failure"] == []
    assert {r["page_url"] for r in got["candidate"]} == {"http://ex.com/dir/p.html"}


# ----------------------------------------------------------------------------- srcset
def test_srcset_candidates_with_invalid_numbers_are_dropped():
    """`b.jpg -5w` (any width beats any density) or `c.jpg 1e400w` (infinite) was taken as the
    largest candidate; the HTML spec drops a candidate whose width is not > 0 or density < 0,
    and browsers never show it."""
    from laion_spark.extract.html import largest_srcset_candidate

    assert largest_srcset_candidate("a.jpg 1x, b.jpg -5w") == "a.jpg"
    assert largest_srcset_candidate("a.jpg 2x, c.jpg 1e400w, d.jpg 0w") == "a.jpg"
    assert largest_srcset_candidate("a.jpg 1x, e.jpg NaNx, f.jpg infx, g.jpg -1x") == "a.jpg"
    assert largest_srcset_candidate("a.jpg 100w, b.jpg 300w") == "b.jpg"
    assert largest_srcset_candidate("a.jpg 0x") == "a.jpg"  # (valid, if useless)
    assert largest_srcset_candidate("a.jpg 50vw, b.jpg 2x") == "b.jpg"  # junk token: lenient
