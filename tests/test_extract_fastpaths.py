"""The WAT path's shortcuts give exactly what the slow, obvious code gives.

`parse_wat_page_fast` (parse only the `IMG@/src` link objects) against `parse_wat_page` (orjson on
the whole document), and `CandidateRules.check_url`'s absolute and relative shortcuts against
urljoin/urlsplit: on the real Common Crawl WAT records, on adversarial documents built to trip a
byte-level reader, and on random references. Then whole files: the rows with the fast WAT parse
switched off equal the rows with it on."""
from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from urllib.parse import urljoin, urlsplit

import orjson
import pytest
from fastwarc.warc import ArchiveIterator
from warcio.warcwriter import WARCWriter

from laion_spark.config import ExtractConfig
from laion_spark.extract import extractor, html
from laion_spark.extract.extractor import extract_file_table, parse_wat_page, parse_wat_page_fast
from laion_spark.extract.rules import (
    ABSOLUTE_HTTP, DROP_INVALID_URL, DROP_SCHEME, CandidateRules,
)

REAL_WATS = ["webindex-wat-18.warc", "CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc.wat",
             "whirlwind.warc.wat.gz"]


def _same_page(fast, full) -> bool:
    """Equal as the extractor uses them (the caller drops links whose last `path` is not IMG@/src)."""
    keep = [link for link in fast.img_links if link.get("path") == "IMG@/src"]
    return (fast.header_meta, fast.base_href, keep) == (full.header_meta, full.base_href, full.img_links)


def _wat_doc(links, *, base=None, head_first=False, as_lists=False, title="t") -> bytes:
    wrap = (lambda v: [v]) if as_lists else (lambda v: v)
    head = {"Title": title, "Metas": [{"name": "x}{", "content": '"Base":"no"'}],
            "Link": [{"path": "LINK@/href", "url": "/s.css", "rel": "stylesheet"}]}
    if base is not None:
        head["Base"] = wrap(base)
    html = {"Head": head, "Links": links} if head_first else {"Links": links, "Head": head}
    doc = {"Container": {"Filename": "x.warc.gz", "Offset": "1"},
           "Envelope": {"Format": "WARC", "WARC-Header-Metadata": {
               "WARC-Type": wrap("response"), "WARC-Target-URI": wrap("https://ex.org/a/p.html"),
               "WARC-Date": wrap("2025-01-02T03:04:05Z")},
               "Payload-Metadata": {"HTTP-Response-Metadata": {
                   "Headers": {"Content-Type": "text/html", "X-Note": "a } brace { and \"quotes\""},
                   "HTML-Metadata": html}}}}
    return orjson.dumps(doc)  # compact, as Common Crawl writes WAT JSON


def test_fast_wat_parse_equals_full_parse_on_real_records(real_data):
    n_fast = 0
    for name in REAL_WATS:
        with (real_data / name).open("rb") as fh:
            for rec in ArchiveIterator(fh, parse_http=False):
                block = rec.reader.read()
                if b"IMG@" not in block:
                    continue
                fast = parse_wat_page_fast(block)
                assert fast is not None, f"{name}@{rec.stream_pos}: compact CC JSON takes the fast path"
                assert _same_page(fast, parse_wat_page(block))
                n_fast += 1
    assert n_fast == 5  # the five real response records with IMG@/src links


ADVERSARIAL_LINKS = [
    [{"alt": "a { brace", "path": "IMG@/src", "url": "a.jpg"}],
    [{"alt": "a } brace", "path": "IMG@/src", "url": "a.jpg"}],
    [{"alt": 'x","path":"IMG@/src","url":"evil.jpg', "path": "A@/href", "url": "a.html"}],
    [{"alt": '{"path":"IMG@/src"}', "path": "IMG@/src", "url": "b.jpg"}],
    [{"alt": "x{", "path": "IMG@/src", "url": "u{}.jpg"}, {"alt": "}", "path": "IMG@/src", "url": "v.jpg"}],
    [{"alt": "IMG@/src", "path": "IMG@/src", "url": "c.jpg"}, {"text": "IMG@/src", "path": "A@/href", "url": "d"}],
    [{"alt": "quote \" and backslash \\ and \\\" end", "path": "IMG@/src", "url": "q.jpg"}],
    [{"alt": "unicode é 漢字 \u2028 \U0001F600", "path": "IMG@/src", "url": "/ü.jpg", "title": "T"}],
    [{"alt": ["list alt"], "path": "IMG@/src", "url": ["list.jpg"]}],
    [{"path": "IMG@/src", "url": "no-alt.jpg"}, {"path": "IMG@/src", "alt": "no url"}],
    [{"path": "IMG@/src", "url": "dup.jpg", "alt": "dup path"}],
    [{"text": "link " * 50, "path": "A@/href", "url": "x.html"}] * 20
    + [{"alt": "after many links", "path": "IMG@/src", "url": "z.png"}],
    [],
]


@pytest.mark.parametrize("links", ADVERSARIAL_LINKS)
@pytest.mark.parametrize("variant", ["head-after", "head-first", "base", "base-head-first", "lists"])
def test_fast_wat_parse_equals_full_parse_on_adversarial_records(links, variant):
    doc = _wat_doc(links, base="https://cdn.ex.org/s/" if "base" in variant else None,
                   head_first="head-first" in variant, as_lists=variant == "lists")
    full = parse_wat_page(doc)
    fast = parse_wat_page_fast(doc)
    assert fast is None or _same_page(fast, full)
    # a repeated key: the last `path` counts, in both
    dup = doc.replace(b'"url":"dup.jpg"', b'"url":"dup.jpg","path":"A@/href"')
    fast_dup, full_dup = parse_wat_page_fast(dup), parse_wat_page(dup)
    assert fast_dup is None or _same_page(fast_dup, full_dup)


def test_fast_wat_parse_declines_what_it_cannot_read_exactly():
    links = [{"alt": "a cat", "path": "IMG@/src", "url": "a.jpg"}]
    compact = _wat_doc(links)
    assert parse_wat_page_fast(compact) is not None
    spaced = json.dumps(orjson.loads(compact)).encode()  # '": ' separators
    assert parse_wat_page_fast(spaced) is None
    cut = compact[:compact.index(b"stylesheet")]  # truncated inside a value
    assert parse_wat_page_fast(cut) is None
    with pytest.raises(ValueError):
        parse_wat_page(cut)  # ... which the whole-document parse reports (a failure row)
    # everything outside Links comes from orjson, spaced or not: Head.Base is exact either way
    with_base = _wat_doc(links, base="https://cdn.ex.org/")
    spaced_head = with_base.replace(b'"Head":{', b'"Head" :{')
    assert parse_wat_page_fast(spaced_head) == parse_wat_page(spaced_head)
    assert parse_wat_page_fast(with_base).base_href == "https://cdn.ex.org/"


def _write_wat(path, docs: list[bytes]) -> None:
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for i, body in enumerate(docs):
            writer.write_record(writer.create_warc_record(
                f"https://ex.org/{i}", "metadata", payload=io.BytesIO(body), length=len(body),
                warc_content_type="application/json"))


@pytest.mark.parametrize("source", ["real", "adversarial"])
def test_rows_with_and_without_the_fast_wat_parse_are_identical(real_data, tmp_path, monkeypatch, source):
    if source == "real":
        paths = [real_data / name for name in REAL_WATS]
    else:
        path = tmp_path / "adv.warc.wat.gz"
        _write_wat(path, [_wat_doc(links, base=base, head_first=hf)
                          for links in ADVERSARIAL_LINKS
                          for base in (None, "../up/", "https://cdn.ex.org/s/") for hf in (False, True)])
        paths = [path]
    cfg = ExtractConfig(min_text_length=1)
    for path in paths:
        fast = extract_file_table(str(path), cfg).drop_columns(["seconds", "extracted_at"]).to_pylist()
        with monkeypatch.context() as m:
            m.setattr(extractor, "parse_wat_page_fast", lambda block: None)
            slow = extract_file_table(str(path), cfg).drop_columns(["seconds", "extracted_at"]).to_pylist()
        assert fast == slow
        assert any(r["kind"] == "candidate" for r in fast) or path.name.startswith("whirlwind")


# ----------------------------------------------------------------------------- URL shortcuts
def _reference_check_url(rules: CandidateRules, base: str, ref: str):
    """check_url as plain urljoin + urlsplit (no shortcuts), the rules in the same order."""
    ref = ref.strip()
    if ref[:11].lower().startswith(("data:", "javascript:")):
        return None, DROP_SCHEME
    try:
        url = urljoin(base, ref)
        parts = urlsplit(url)
        hostname = parts.hostname or ""
    except ValueError:
        return None, DROP_INVALID_URL
    if parts.scheme.lower() not in rules.schemes:
        return None, DROP_SCHEME
    if not hostname:
        return None, DROP_INVALID_URL
    return url, None


def test_relative_reference_shortcut_equals_urljoin():
    rules = CandidateRules(ExtractConfig(drop_extensions=[], max_hostname_length=10**6,
                                         max_url_length=10**9))
    rng = random.Random(7)
    pieces = ["a", "b", "/", ".", "..", "?", "#", ";", ":", "//", " ", "\t", "%2e", "é", "x.jpg",
              "=", "&", "\\", "@", "~", "\x01"]
    bases = ["http://h.com", "http://h.com/", "https://h.com/a/b", "https://h.com/a/b/",
             "http://h.com/a//b/c", "http://h.com/a/./b", "http://h.com/a;p/b", "HTTP://H.com/a/b?q#f",
             "http://u@h.com:80/x/y.html?z", "http://[::1]/a/", "ftp://h.com/a/", "http://h.com?x",
             "http://h.com/a/b;x", "https://h.com/%7Eu/é/"]
    for _ in range(40_000):
        base = rng.choice(bases)
        ref = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        assert rules.check_url(base, ref) == _reference_check_url(rules, base, ref), (base, ref)


def test_absolute_url_host_regex_equals_partition():
    def by_partition(url):  # the hostname as urlsplit reads it, by hand; None: IPv6 (urlsplit's way)
        start = url.index("//") + 2
        end = min([i for i in (url.find(c, start) for c in "/?#") if i >= 0] + [len(url)])
        netloc = url[start:end]
        return None if "[" in netloc else netloc.rpartition("@")[2].partition(":")[0]

    rng = random.Random(3)
    for alphabet in ("ab:@/?#[].x", "a@:/", "a]@:[?", "ab\n :@/?#"):
        for _ in range(20_000):
            url = rng.choice(["http://", "HTTPS://", "hTtp://"]) + "".join(
                rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            m = ABSOLUTE_HTTP(url)
            assert (m.group(1) if m else None) == by_partition(url), url


# ----------------------------------------------------------------------------- HTML nesting scan
# The obvious, slow reference of `html.html_nesting`'s estimate: the regex removal of raw text,
# the regex tag tokens, and a Python walk (per element name an open count floored at 0).
_REF_RAW_TEXT = re.compile(rb"(?is)<(script|style|textarea|title|xmp|iframe|noembed|noframes)\b.*?"
                           rb"(?:</\1|\Z)|<!--.*?(?:-->|\Z)|<plaintext\b.*")
_REF_TAG = re.compile(rb"<(/?[a-zA-Z][^\s/>]*)")


def _reference_nesting(body: bytes) -> tuple[int, int]:
    """(deepest estimated depth, work) as a plain loop."""
    opened: Counter = Counter()
    depth = deepest = work = 0
    for tok in _REF_TAG.findall(_REF_RAW_TEXT.sub(b"", body.lower())):
        if tok[:1] == b"/":
            if opened[tok[1:]] > 0:
                opened[tok[1:]] -= 1
                depth -= 1
        elif tok not in html._VOID:
            opened[tok] += 1
            depth += 1
            work += depth
            deepest = max(deepest, depth)
    return deepest, work


def _verdict(deepest: int, work: int, max_depth: int, max_work: int):
    if deepest > max_depth:
        return f"nesting depth over {max_depth} (estimated {deepest})"
    if work > max_work:
        return f"tree-building work over {max_work} (estimated {work})"
    return None


def _real_pages(real_data) -> list[bytes]:
    """Every HTML body of the real WARC files (the big warcbase pages are the ones scanned)."""
    from laion_spark.extract.extractor import _is_http_record, decode_http_body, split_http_response
    from laion_spark.extract.records import RawRecord, iter_records

    pages = []
    for src in sorted(real_data.glob("*.warc*")):
        with src.open("rb") as fh:
            for rec in iter_records(fh):
                if isinstance(rec, RawRecord) and rec.warc_type == "response" and _is_http_record(rec):
                    parsed = split_http_response(rec.block)
                    if parsed:
                        pages.append(decode_http_body(parsed[1], rec.block[parsed[2]:])[0])
    return pages


def _check_scan(body: bytes, limits) -> bool:
    """The numpy scan's pieces and the estimate equal the references; True if the fast token
    reader decided (False: it handed over to the regex way)."""
    low = body.lower()
    text = html.strip_raw_text(low)
    assert text == _REF_RAW_TEXT.sub(b"", low)
    tokens = _REF_TAG.findall(text)
    fast = html._tags_fast(text)
    for found in (fast, html._tags_regex(text)):
        if found is not None:
            names, inverse, is_end = found
            assert [b"/" + names[i] if e else names[i]
                    for i, e in zip(inverse.tolist(), is_end.tolist())] == tokens
    reference = _reference_nesting(body)
    bound = html.open_bound(body)  # the shortcut may only skip pages the estimate passes
    assert bound[0] >= reference[0] and bound[1] >= reference[1], (bound, reference)
    for max_depth, max_work in limits:
        assert html.html_nesting(body, max_depth, max_work) == _verdict(*reference, max_depth, max_work)
    return fast is not None


def test_nesting_scan_equals_the_reference_on_real_pages(real_data):
    """Real pages with limits low enough that every one is scanned in full, and at the defaults."""
    pages = _real_pages(real_data)
    biggest = max(pages, key=lambda p: p.count(b"<"))
    assert biggest.count(b"<") > 60_000  # the 1.2 MB warcbase page the benchmark's WARC holds
    assert _check_scan(biggest, [(32_768, 540_000_000), (500, 10**12), (10**6, 100_000)])
    most_tags = sorted(pages, key=lambda p: p.count(b"<"))[-40:]
    n_fast = sum(_check_scan(p, [(40, 10**12), (10**6, 300)]) for p in most_tags)
    assert n_fast > 25  # (binary bodies sent as text/html hold `<` inside "names": the regex way)


def test_nesting_scan_equals_the_reference_on_random_markup():
    rng = random.Random(11)
    pieces = [b"<div>", b"</div>", b"<p>", b"</p>", b"<img src=x>", b"<br/>", b"<BR\t", b"<script>",
              b"</script>", b"<!--", b"-->", b"</a>", b"x", b" ", b"\n", b"<DIV\x0c", b"<span>",
              b"</span\n>", b"<title>", b"</title>", b"<plaintext>", b"<!doctype html>", b"<scriptx>",
              b"<textarea>", b"<imgx>", b"<IMG>", b"<\xff>", b"<a\x00b>", b"</>", b"<basefont>",
              b"<sixteen-bytes-xx>", b"</sixteen-bytes-xx>", b"<seventeen-bytes-x>", b"<y-\xc3\xa9>"]
    odd = [b"<", b"< ", b"<1", b"<a<b>", b"</textarea", b"/", b">", b"<td/>", b"</td>", b"<TD>", b"</br>",
           b"</img>", b"<a title='<b>'>", b"<b>", b"</b>", b"<abcdefg>", b"</abcdefg>", b"<abcdefgh>",
           b"</abcdefgh>", b"</abcdefgi>", b"<a[>", b"</a{>", b"</A\t>", b"<!-- <i> -->", b"</i>"]
    n_fast = 0
    for i in range(600):
        alphabet = pieces + odd if i % 3 == 0 else pieces
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        if i % 7 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))) + body
        n_fast += _check_scan(body, [(6, 10**9), (25, 300)])
    assert n_fast > 250


def test_open_bound_is_never_below_the_estimate_and_spares_flat_pages(monkeypatch):
    """`open_bound` lets `html_nesting` skip the scan: it must bound the reference estimate on
    any markup (names compared exactly: `<a[>` … `</a{>` is no pair), and be low on a long flat
    table (the 1.2 MB warcbase page's shape: 35k start tags, all closed, depth ~10)."""
    rng = random.Random(5)
    pieces = [b"<div>", b"</div>", b"<p>", b"</P>", b"<img src=x>", b"<br/>", b"</br>", b"<script>",
              b"</script>", b"<!--", b"-->", b"<a href=1>", b"</a>", b"x", b"\n", b"<span>", b"</span\n>",
              b"<title>", b"</title>", b"<plaintext>", b"<td/>", b"</td>", b"<a title='<b>'>", b"<b>",
              b"</b>", b"<abcdefg>", b"</abcdefg>", b"<abcdefgh>", b"</abcdefgh>", b"</abcdefgi>",
              b"<a[>", b"</a{>", b"<basefont>", b"</basefont>", b"<a<b>", b"<", b"</", b"<!x>", b"<\xff>"]
    for i in range(3000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        if i % 7 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))) + body
        bound, reference = html.open_bound(body), _reference_nesting(body)
        assert bound[0] >= reference[0] and bound[1] >= reference[1], (body, bound, reference)
    assert html.open_bound(b"<a[>x</a{>" * 100)[0] == 100  # a lookalike end closes nothing
    row = b'<tr style="c"> <td><a href="/x">name</a></td> <td>1</td> <td>57</td> </tr>\n'
    flat = b"<html><body><table>" + row * 6000 + b"</table></body></html>"
    depth, work = html.open_bound(flat)
    assert depth == 2 * 6000 + 4 and work < 2 * 10**8  # each row leaves its tr and first td open
    assert flat.count(b"<") - flat.count(b"</") == 5 * 6000 + 3  # the old bound: over 18,000
    monkeypatch.setattr(html, "strip_raw_text", None)  # the full scan is not reached
    assert html.html_nesting(flat, 18_000, 2 * 10**8) is None


def test_record_header_tripwire_equals_the_substring_search():
    from laion_spark.extract.records import _SWALLOWED, holds_record_header

    rng = random.Random(9)
    pieces = [b"\r", b"\n", b"\r\n", b"WARC/1.", b"WARC/1.0", b"\r\nWARC/1", b"x" * 50, b"\r\nWARC/1.1\r\n",
              b"<p>", b"\r\r", b"WARC/"]
    n_true = 0
    for i in range(4000):
        block = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60 if i % 2 else 8)))
        assert holds_record_header(block) == (_SWALLOWED in block), block
        n_true += _SWALLOWED in block
    assert 500 < n_true < 3500
    many_cr = b"<p>a line\r\n" * 1000
    assert not holds_record_header(many_cr) and holds_record_header(many_cr + b"\r\nWARC/1.0\r\n")
