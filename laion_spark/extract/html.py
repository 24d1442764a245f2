"""HTML → `<img>` references: charset decoding, the fast selectolax (lexbor) extractor on the hot
path, and a BeautifulSoup reference extractor that tests compare it against.

Why our own charset step: lexbor assumes UTF-8; a Shift_JIS or windows-1252 page decoded as UTF-8
turns every non-ASCII alt text into U+FFFD, and those are exactly the `multi` candidates.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Optional

# The first bytes of a page where <meta charset> must appear (HTML spec: 1024; real pages are sloppier).
_META_SNIFF_BYTES = 4096
_META_CHARSET_RE = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.IGNORECASE
)
_HEADER_CHARSET_RE = re.compile(r"""charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.IGNORECASE)

# WHATWG encoding labels that differ from what Python's codec of the same name does.
_WHATWG_ALIASES = {
    "iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252",
    "l1": "cp1252", "us-ascii": "cp1252", "ascii": "cp1252", "windows-1252": "cp1252",
    "iso-8859-9": "cp1254", "latin5": "cp1254", "windows-1254": "cp1254",
    "iso-8859-11": "cp874", "tis-620": "cp874", "windows-874": "cp874",
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "windows-31j": "cp932", "ms_kanji": "cp932",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "gb_2312-80": "gb18030",
    "euc-kr": "cp949", "ks_c_5601-1987": "cp949",
    "big5": "big5hkscs", "x-user-defined": "cp1252", "utf8": "utf-8", "unicode-1-1-utf-8": "utf-8",
}


def normalise_charset(label: Optional[str]) -> Optional[str]:
    """A Python codec name for a charset label from a header or <meta>, or None when unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    if not label:
        return None
    name = _WHATWG_ALIASES.get(label, label)
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        return None
    # A page that claims UTF-16 in <meta> but was served as bytes we sniffed as ASCII is UTF-8 (spec).
    if codec.startswith("utf-16") or codec.startswith("utf-32"):
        return "utf-8"
    return codec


def charset_from_content_type(content_type: Optional[str]) -> Optional[str]:
    if not content_type:
        return None
    m = _HEADER_CHARSET_RE.search(content_type)
    return m.group(1) if m else None


def decode_html(body: bytes, header_charset: Optional[str] = None) -> tuple[str, str]:
    """Decode a page the way a browser would: BOM, then the HTTP header's charset, then <meta>,
    then UTF-8 if it decodes cleanly, else windows-1252. Never raises; returns (text, codec)."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8", errors="replace"), "utf-8"
    if body.startswith(codecs.BOM_UTF16_LE) or body.startswith(codecs.BOM_UTF16_BE):
        return body.decode("utf-16", errors="replace"), "utf-16"
    codec = normalise_charset(header_charset)
    if codec is None:
        m = _META_CHARSET_RE.search(body, 0, _META_SNIFF_BYTES)
        if m:
            codec = normalise_charset(m.group(1).decode("ascii", errors="ignore"))
    if codec is not None:
        try:
            return body.decode(codec, errors="replace"), codec
        except Exception:  # a codec that cannot run on this input (should not happen with 'replace')
            pass
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return body.decode("cp1252", errors="replace"), "cp1252"


@dataclass
class ImageRef:
    """One `<img>` as the page wrote it: the URL reference (unresolved), where it came from, alt, title."""

    ref: str
    source: str  # data-src | data-original | data-lazy-src | src | srcset | data-srcset
    alt: Optional[str]
    title: Optional[str]


@dataclass
class PageImages:
    """What a page gives the extractor: its `<base href>` (raw) and its images in document order."""

    base_href: Optional[str]
    images: list[ImageRef]


# Lazy loaders put the real image in data-*; `src` then holds a placeholder (a 1×1 gif, a data: URI),
# so a data-* URL wins over src, as a browser running the page's script would show it.
LAZY_ATTRIBUTES = ("data-src", "data-original", "data-lazy-src")
_SRCSET_ATTRIBUTES = ("srcset", "data-srcset")


def largest_srcset_candidate(srcset: str) -> Optional[str]:
    """The URL of the largest candidate of a srcset (by `w`, else by `x`; no descriptor is 1x).

    Follows the HTML spec's splitting: a URL runs to whitespace, a comma ends a candidate, so
    commas inside URLs (`/img,q_80/a.jpg 2x`) survive."""
    best_url, best_key = None, (-1, -1.0)
    i, n = 0, len(srcset)
    while i < n:
        while i < n and (srcset[i].isspace() or srcset[i] == ","):
            i += 1
        if i >= n:
            break
        start = i
        while i < n and not srcset[i].isspace():
            i += 1
        url = srcset[start:i]
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start = i
            depth = 0
            while i < n:
                c = srcset[i]
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth = max(0, depth - 1)
                elif c == "," and depth == 0:
                    break
                i += 1
            descriptor = srcset[start:i].strip()
        if not url:
            continue
        key = (0, 1.0)
        for token in descriptor.split():
            try:
                if token.endswith("w"):
                    key = (1, float(token[:-1]))
                elif token.endswith("x"):
                    key = (0, float(token[:-1]))
            except ValueError:
                continue
        if key > best_key:
            best_url, best_key = url, key
    return best_url


def choose_image_ref(attrs: dict) -> Optional[tuple[str, str]]:
    """(reference, attribute name) of an `<img>`'s image: data-src-like, else src, else srcset."""
    for name in LAZY_ATTRIBUTES:
        value = attrs.get(name)
        if value and value.strip():
            return value, name
    value = attrs.get("src")
    if value and value.strip():
        return value, "src"
    for name in _SRCSET_ATTRIBUTES:
        value = attrs.get(name)
        if value and value.strip():
            url = largest_srcset_candidate(value)
            if url:
                return url, name
    return None


def extract_images(html_text: str) -> PageImages:
    """Every `<img>` of a page with selectolax's lexbor (HTML5 tree building: comments and
    `<script>` strings are not elements, so decoy `<img>` there are not found)."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html_text)
    base_href = None
    for node in tree.css("base"):
        href = node.attributes.get("href")
        if href is not None:
            base_href = href
            break
    images = []
    for node in tree.css("img"):
        attrs = node.attributes
        chosen = choose_image_ref(attrs)
        if chosen is None:
            continue
        images.append(ImageRef(chosen[0], chosen[1], _attr(attrs, "alt"), _attr(attrs, "title")))
    return PageImages(base_href, images)


def _attr(attrs: dict, name: str) -> Optional[str]:
    """An attribute's value; a bare attribute (`<img alt>`) is the empty string, as HTML5 says
    (lexbor reports it as None, which would read as 'no alt')."""
    value = attrs.get(name)
    if value is None and name in attrs:
        return ""
    return value


def extract_images_reference(html_text: str) -> PageImages:
    """The same extraction with BeautifulSoup + lxml: slow, independent, the tests' reference."""
    import warnings

    from bs4 import BeautifulSoup, SoupStrainer, XMLParsedAsHTMLWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        # lxml's HTML parser decides what is a comment or a script; the strainer only keeps
        # the <img>/<base> elements it reports, which makes the reference ~3x faster.
        soup = BeautifulSoup(html_text, "lxml", parse_only=SoupStrainer(["img", "base"]))
    base_href = None
    for node in soup.find_all("base"):
        if node.get("href") is not None:
            base_href = node.get("href")
            break
    images = []
    for node in soup.find_all("img"):
        attrs = {k.lower(): (" ".join(v) if isinstance(v, list) else v) for k, v in node.attrs.items()}
        chosen = choose_image_ref(attrs)
        if chosen is None:
            continue
        images.append(ImageRef(chosen[0], chosen[1], attrs.get("alt"), attrs.get("title")))
    return PageImages(base_href, images)
