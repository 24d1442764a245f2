"""`textfix.fix_text` (ftfy's loop, skipping fixers that cannot act) gives exactly what
`ftfy.fix_text` gives: on every alt and title text of the real data, on generated mojibake, and
the proof it rests on (every branch of ftfy's mojibake pattern needs a non-ASCII witness)."""
from __future__ import annotations

import gzip
import random

import ftfy
import pytest
from ftfy import badness

from laion_spark.extract import textfix
from laion_spark.extract.html import decode_html, extract_images


def _real_texts(real_data) -> set[str]:
    """Every alt and title text of the real HTML pages (article pages and WARC responses) and of
    the real WAT links."""
    import orjson
    from fastwarc.warc import ArchiveIterator

    from laion_spark.extract.extractor import (_is_http_record, _looks_like_html, decode_http_body,
                                               split_http_response)
    from laion_spark.extract.records import RawRecord, iter_records

    bodies = [gzip.decompress(p.read_bytes()) for p in sorted((real_data / "article-pages").glob("**/*.html.gz"))]
    for src in sorted(real_data.glob("*.warc*")):
        with src.open("rb") as fh:
            for rec in iter_records(fh):
                if isinstance(rec, RawRecord) and rec.warc_type == "response" and _is_http_record(rec):
                    parsed = split_http_response(rec.block)
                    if parsed and _looks_like_html(parsed[1].get("content-type"), rec.block[parsed[2]:]):
                        bodies.append(decode_http_body(parsed[1], rec.block[parsed[2]:])[0])
    texts: set[str] = set()
    for body in bodies:
        for img in extract_images(decode_html(body)[0]).images:
            texts.update(t for t in (img.alt, img.title) if t)
    for name in ("webindex-wat-18.warc", "CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc.wat"):
        with (real_data / name).open("rb") as fh:
            for rec in ArchiveIterator(fh, parse_http=False):
                block = rec.reader.read()
                if b"IMG@" in block:
                    doc = orjson.loads(block[block.find(b"{"):])
                    links = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"]
                    texts.update(v for link in links for k, v in link.items()
                                 if k in ("alt", "title") and isinstance(v, str) and v)
    return texts


def test_every_badness_branch_needs_a_non_ascii_witness():
    witnesses = textfix._mojibake_witnesses(badness.BADNESS_RE)
    assert witnesses is not None and min(witnesses) >= 0x80
    assert textfix._tables() is not None  # the fast path is on for the installed ftfy


def test_equals_ftfy_on_every_real_alt_and_title_text(real_data):
    texts = _real_texts(real_data)
    assert len(texts) > 2000
    non_ascii = [t for t in texts if not t.isascii() or "&" in t]
    assert len(non_ascii) > 150
    for text in texts:
        assert textfix.fix_text(text) == ftfy.fix_text(text), repr(text)


_WORDS = ["café", "naïve", "Москва", "Ελλάδα", "東京", "ภาษาไทย", "İstanbul", "Łódź", "Straße", "Þór",
          "€ 5", "don’t", "“quoted”", "ﬁnal", "ＬＯＵＤ", "½ price", "à la", "Ðiên", "№ 7", "x²",
          "e\u0301", "\u00a0nbsp", "tab\tx", "<b>", "AT&T", "&amp;", "&eacute;", "&Eacute;", "&#x2019;",
          "\x1b[31mred\x1b[0m", "\x85", "\x93hi\x94", "\r\n", "line\u2028sep", "\ufeffbom", "\x00", "ŉ",
          "Ǆ", "a\ud800b", "✔", "☃", "—", "…", "™", "\n"]
_CODECS = ["latin-1", "windows-1252", "sloppy-windows-1252", "windows-1251", "sloppy-windows-1251",
           "windows-1250", "macroman", "cp437", "windows-1253", "windows-1257", "iso-8859-2"]


def _mojibake(rng: random.Random) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))
    for _ in range(rng.randint(0, 2)):  # once or twice decoded in a wrong codec
        codec = rng.choice(_CODECS)
        text = text.encode("utf-8", "surrogatepass").decode(codec, errors="replace")
    if rng.random() < 0.3:  # a little fixed text around it
        text = rng.choice(_WORDS) + " " + text + " " + rng.choice(_WORDS)
    return text


@pytest.mark.parametrize("seed", [1, 2])
def test_equals_ftfy_on_generated_mojibake(seed):
    import ftfy.bad_codecs  # noqa: F401 - registers the sloppy-* codecs

    rng = random.Random(seed)
    changed = 0
    for _ in range(1500):
        text = _mojibake(rng)
        fixed = ftfy.fix_text(text)
        assert textfix.fix_text(text) == fixed, repr(text)
        changed += fixed != text
    assert changed > 700  # most of them are mojibake ftfy repairs, not text it leaves alone


def test_witness_free_text_is_never_bad():
    """The proof's claim, checked on text: a string with no witness character is not `is_bad`."""
    maybe_bad = textfix._tables()[0]
    rng = random.Random(5)
    alphabet = [chr(c) for c in range(0x20, 0x2200) if not 0xD800 <= c < 0xE000]
    clean = 0
    for _ in range(4000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        if not maybe_bad(text):
            clean += 1
            assert not badness.is_bad(text), repr(text)
    assert clean > 500
