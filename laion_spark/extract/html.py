"""HTML → `<img>` references: charset decoding, the fast selectolax (lexbor) extractor on the hot
path, and a BeautifulSoup reference extractor that tests compare it against.

Why our own charset step: lexbor assumes UTF-8; a Shift_JIS or windows-1252 page decoded as UTF-8
turns every non-ASCII alt text into U+FFFD, and those are exactly the `multi` candidates.
"""
from __future__ import annotations

import codecs
import functools
import math
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

# The first bytes of a page where <meta charset> must appear (HTML spec: 1024; real pages are sloppier).
_META_SNIFF_BYTES = 4096
_META_CHARSET_RE = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.IGNORECASE
)
_HEADER_CHARSET_RE = re.compile(r"""charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.IGNORECASE)

# WHATWG encoding labels that differ from what Python's codec of the same name does, or that
# Python does not know.
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
    "unicode11utf8": "utf-8", "unicode20utf8": "utf-8", "x-unicode20utf8": "utf-8",
    "x-mac-roman": "mac-roman", "x-mac-cyrillic": "mac-cyrillic", "x-mac-ukrainian": "mac-cyrillic",
    "iso-8859-8-i": "iso8859-8", "csiso88598i": "iso8859-8", "logical": "iso8859-8",
    "dos-866": "cp866", "x-euc-jp": "euc_jp", "cseucpkdfmtjapanese": "euc_jp", "koi": "koi8-r",
    "koi8": "koi8-r", "koi8-ru": "koi8-u", "iso88592": "iso8859-2",
    "utf-16": "utf-16-le", "ucs-2": "utf-16-le", "unicode": "utf-16-le", "csunicode": "utf-16-le",
    "iso-10646-ucs-2": "utf-16-le", "unicodefeff": "utf-16-le", "unicodefffe": "utf-16-be",
    **{f"x-cp{n}": f"cp{n}" for n in range(1250, 1259)},
}
# Python codec names of the same charsets under other labels (`latin_1`, `8859`, `cp819`...).
_CODEC_AS = {"iso8859-1": "cp1252", "ascii": "cp1252", "iso8859-9": "cp1254",
             "iso8859-11": "cp874", "tis-620": "cp874", "euc_kr": "cp949", "shift_jis": "cp932",
             "gbk": "gb18030", "gb2312": "gb18030", "big5": "big5hkscs", "utf-16": "utf-16-le"}
# The encodings of the WHATWG Encoding standard (what browsers decode), as Python codec names.
# Any other codec Python has is not a web charset: `<meta charset=punycode>`, `utf-7`,
# `unicode_escape`, `rot13`, `utf-8-sig`... would turn a page into something no browser shows
# (UTF-7 is refused by browsers for the scripts it smuggles), so such a label is ignored.
WEB_CODECS = frozenset(
    ["utf-8", "cp866", "koi8-r", "koi8-u", "mac-roman", "mac-cyrillic", "cp874", "gb18030",
     "big5hkscs", "euc_jp", "iso2022_jp", "cp932", "cp949", "utf-16-le", "utf-16-be"]
    + [f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)]
    + [f"cp{n}" for n in range(1250, 1259)])


def normalise_charset(label: Optional[str], from_meta: bool = True) -> Optional[str]:
    """A Python codec name for a charset label from a header or <meta>, or None when it names
    no web encoding (WEB_CODECS). A UTF-16 label in `<meta>` means UTF-8 (the HTML spec: the
    prescan read it as ASCII-compatible bytes); in the HTTP header it is UTF-16, as browsers
    decode it."""
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
    codec = _CODEC_AS.get(codec, codec)
    if codec not in WEB_CODECS:
        return None
    if from_meta and codec.startswith("utf-16"):
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
    text, codec, _source = decode_html_sniffed(body, header_charset)
    return text, codec


def decode_html_sniffed(body: bytes, header_charset: Optional[str] = None) -> tuple[str, str, str]:
    """(text, codec, where the codec came from: bom | header | meta | meta_on_utf8 | utf8 | fallback).

    When only `<meta>` names a legacy charset and the bytes are valid (non-ASCII) UTF-8, the
    meta charset is used, as the WHATWG sniffing algorithm (and so every browser) does: the
    alt text then holds mojibake that `ftfy.fix_text` repairs, as in LAION-5B. The source is
    `meta_on_utf8`, so the extractor can count such pages."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8", errors="replace"), "utf-8", "bom"
    if body.startswith(codecs.BOM_UTF16_LE) or body.startswith(codecs.BOM_UTF16_BE):
        return body.decode("utf-16", errors="replace"), "utf-16", "bom"
    codec = normalise_charset(header_charset, from_meta=False)
    source = "header"
    if codec is None:
        m = _META_CHARSET_RE.search(body, 0, _META_SNIFF_BYTES)
        if m:
            codec = normalise_charset(m.group(1).decode("ascii", errors="ignore"))
            source = "meta"
    if codec is not None:
        try:
            text = body.decode(codec, errors="replace")
        except Exception:  # a codec that cannot run on this input (should not happen with 'replace')
            text = None
        if text is not None:
            if source == "meta" and codec != "utf-8" and not body.isascii():
                try:
                    body.decode("utf-8")
                    source = "meta_on_utf8"
                except UnicodeDecodeError:
                    pass
            return text, codec, source
    try:
        return body.decode("utf-8"), "utf-8", "utf8"
    except UnicodeDecodeError:
        return body.decode("cp1252", errors="replace"), "cp1252", "fallback"


# ------------------------------------------------------------------------------- nesting limit
# Elements that never hold others (no end tag), and raw-text elements whose content is not markup.
_VOID = frozenset(b"area base br col embed hr img input keygen link meta param source track wbr "
                  b"basefont bgsound frame image".split())
# Where script/style/comment-like text starts; it ends at the first `</name` (`-->` for a
# comment) or at the end of the page, and `<plaintext>` runs to the end.
_RAW_START = re.compile(rb"<(script|style|textarea|title|xmp|iframe|noembed|noframes)\b|<!--|<plaintext\b")
_TAG_NAME = re.compile(rb"<(/?[a-zA-Z][^\s/>]*)")
# A tag name ends at whitespace (`\s` of a bytes regex), `/` or `>`: all mapped to `>`.
_TO_GT = bytes.maketrans(b" \t\n\r\f\v/", b">>>>>>>")
_MAX_FAST_NAME = 16  # longer tag names (rare custom elements) take the regex way


def strip_raw_text(low: bytes) -> bytes:
    """The page without script, style, textarea, title, xmp, iframe, noembed and noframes
    content (each to its first `</name`), comments (to `-->`) and anything after `<plaintext`:
    text a parser does not read as tags. Literal searches (memchr speed), not a lazy regex."""
    search, find, n = _RAW_START.search, low.find, len(low)
    pieces = []
    pos = 0
    m = search(low, 0)
    while m is not None:
        pieces.append(low[pos:m.start()])
        name = m.group(1)
        if name is not None:
            end = find(b"</" + name, m.end())
            pos = n if end < 0 else end + 2 + len(name)
        elif m.end() - m.start() == 4:  # <!--
            end = find(b"-->", m.end())
            pos = n if end < 0 else end + 3
        else:  # <plaintext
            pos = n
        if pos >= n:
            break
        m = search(low, pos)
    if pos < n:
        pieces.append(low[pos:])
    return b"".join(pieces)


def _tags_regex(text: bytes) -> tuple[list[bytes], "np.ndarray", "np.ndarray"]:
    """(distinct names, name index per tag, is-end per tag) of `_TAG_NAME`'s tags: the exact
    reference, and the way taken when `_tags_fast` cannot decide."""
    import numpy as np

    ids: dict[bytes, int] = {}
    setdefault = ids.setdefault
    tokens = _TAG_NAME.findall(text)
    is_end = np.fromiter((t[:1] == b"/" for t in tokens), dtype=bool, count=len(tokens))
    inverse = np.fromiter((setdefault(t[1:] if t[:1] == b"/" else t, len(ids)) for t in tokens),
                          dtype=np.int64, count=len(tokens))
    return list(ids), inverse, is_end


def _tags_fast(text: bytes):
    """`_tags_regex`'s tags (names in another order) found with numpy over the bytes, or None
    when a name is over 16 bytes or holds a `<` (`<a<b>` is one tag named `a<b`)."""
    import numpy as np

    n = len(text)
    arr = np.frombuffer(text + b">" * 24, np.uint8)
    lt = np.flatnonzero(arr[:n] == 0x3C)  # every "<"
    is_end = arr[lt + 1] == 0x2F
    start = lt + 1 + is_end  # where the name would start
    first = arr[start] | 0x20  # (ASCII letters: lower-cased by OR 0x20; no other byte maps into a-z)
    ok = (first >= 0x61) & (first <= 0x7A)
    start, is_end = start[ok], is_end[ok]
    if not len(start):
        return [], np.zeros(0, np.int64), np.zeros(0, bool)
    term = np.flatnonzero(np.frombuffer(text.translate(_TO_GT) + b">", np.uint8) == 0x3E)
    length = term[np.searchsorted(term, start)] - start
    next_lt = np.r_[lt, n + 1][np.searchsorted(lt, start)]
    if int(length.max()) > _MAX_FAST_NAME or bool((next_lt < start + length).any()):
        return None
    # each name as two little-endian 64-bit words, bytes past its end masked off
    words = np.ndarray((len(arr) - 7,), dtype="<u8", buffer=arr, strides=(1,))
    masks = _word_masks()
    w0 = words[start] & masks[np.minimum(length, 8)]
    w1 = words[start + 8] & masks[np.clip(length - 8, 0, 8)]
    order = np.lexsort((w1, w0))
    s0, s1 = w0[order], w1[order]
    new = np.r_[True, (s0[1:] != s0[:-1]) | (s1[1:] != s1[:-1])]
    inverse = np.empty(len(order), np.int64)
    inverse[order] = np.cumsum(new) - 1
    heads = order[new]
    names = [text[a:a + k] for a, k in zip(start[heads].tolist(), length[heads].tolist())]
    return names, inverse, is_end


@functools.lru_cache(maxsize=1)
def _word_masks():
    """Masks keeping the first 0…8 bytes of a little-endian 64-bit word."""
    import numpy as np

    return np.array([(1 << (8 * i)) - 1 for i in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


# Lower-cases ASCII letters and maps a tag name's terminators (whitespace, `/`, `>`) to `>`.
_LOWER_TO_GT = bytes.maketrans(bytes(range(0x41, 0x5B)) + b" \t\n\r\f\v/",
                               bytes(range(0x61, 0x7B)) + b">>>>>>>")
_BYTES_3E = 0x3E3E3E3E3E3E3E3E
_BYTES_01 = 0x0101010101010101
_BYTES_80 = 0x8080808080808080


def open_bound(body: bytes, is_lt=None) -> tuple[int, int]:
    """(depth, work) upper bounds of `html_nesting`'s estimate, from the `<` bytes alone: one
    numpy pass, no tokenising, no raw-text removal (~2-4 ms for a 1.2 MB page with 70k tags;
    the estimate itself ~30 ms). `is_lt`: `body == "<"` as a numpy array, if the caller has it.

    Every `<` opens a level except `</`, `<!` and exact void start tags (`<img`, `<br`… then a
    terminator), and an end tag closes one when the token just before it (no `<` between) is a
    start tag of the same name of at most 7 bytes (`<td>1</td>`, `<a href=…>x</a>`): that
    element is certainly open then, so the estimate closes it too. The running sum bounds the
    estimate's depth at every tag, and its sum over start tags bounds the work. Why it is never
    below the estimate: each of the estimate's non-void start tags is one of these `<`; a pair's
    end is either an end the estimate counts too or follows a `<` the estimate does not read
    (script/comment text), which was counted here as opening a level. Names are compared
    exactly (lower-cased bytes up to the terminator), so no two names can be taken for one.
    (Tested against the reference estimate on real and random markup.)"""
    import numpy as np

    n = len(body)
    raw = np.frombuffer(body, np.uint8)
    lt = np.flatnonzero(raw == 0x3C if is_lt is None else is_lt)
    if not len(lt):
        return 0, 0
    low = np.frombuffer(body.translate(_LOWER_TO_GT) + b"\0" * 16, np.uint8)
    words = np.ndarray((len(low) - 7,), dtype="<u8", buffer=low, strides=(1,))
    nxt = raw[np.minimum(lt + 1, n - 1)]  # the byte after each `<`
    nxt[lt + 1 >= n] = 0x3C  # (a `<` as the last byte opens a level, as a start tag would)
    is_end = nxt == 0x2F
    word = words[lt + 1 + is_end]  # the 8 bytes of the name: `td>class=…`, `td>` of `</td>`
    # the name and its terminator as a key: bytes past the first `>` masked off (0: no
    # terminator within 8 bytes, or not a letter first)
    v = word ^ np.uint64(_BYTES_3E)  # a zero byte where the word holds `>`
    t = (v - np.uint64(_BYTES_01)) & ~v & np.uint64(_BYTES_80)  # (exact at the lowest zero byte)
    key = word & (((t & (~t + np.uint64(1))) << np.uint64(1)) - np.uint64(1))
    first = (word & np.uint64(0xFF)).astype(np.uint8)
    key[(t == 0) | (first < 0x61) | (first > 0x7A)] = 0
    step = (~is_end & (nxt != 0x21) & ~np.isin(key, _void_words())).astype(np.int64)
    pair = np.flatnonzero(is_end[1:] & (step[:-1] == 1) & (key[1:] == key[:-1]) & (key[1:] != 0)) + 1
    step[pair] = -1
    depth = np.cumsum(step)
    return int(depth.max()), int(depth[step > 0].sum())


@functools.lru_cache(maxsize=1)
def _void_words():
    """The little-endian words of `name>` (zero bytes after) of the void names of up to 7 bytes."""
    import numpy as np

    return np.array(sorted(int.from_bytes(name + b">", "little") for name in _VOID if len(name) <= 7),
                    dtype=np.uint64)


def html_nesting(body: bytes, max_depth: int, max_work: int) -> Optional[str]:
    """Why lexbor must not parse this page (`depth N at byte B` / `work W`), or None.

    lexbor's tree building walks the stack of open elements on many start tags, so its time
    grows with depth × tags (measured: 128k nested `<div>` take 70 s; 4,000 deep then 100k
    `<div></div>`: 4 s). This bounds both from above, cheaply: a page with n `<` has depth ≤ n
    and work ≤ n(n + 1)/2, so at the defaults a page under 98 KB costs nothing and one with at
    most 32,768 `<` (all 181 real article pages) one byte count. `open_bound` (a few numpy
    passes over the `<` bytes: ~3 ms for a 1.2 MB page with 70k tags) decides the others,
    unless they nest deeply or leave many tags unclosed. Only those are scanned: script/style/
    comment text removed, then every start tag of a non-void element opens a level, and an end
    tag closes one only if an element of its name is open (stray end tags are ignored by parsers
    and here; implied ends are not modelled, so the estimate is high). The scan is numpy over
    the bytes (~30 ms for a 1.2 MB page with 70k tags), with an exact regex way for pages whose
    tag names it cannot read."""
    # A start tag takes 3 bytes at least (`<a>`; `<a<b>` is one tag named `a<b`), so a page of
    # L bytes has at most L/3 + 1 of them: most pages need not even be counted. m start tags
    # give depth ≤ m and work ≤ 1 + 2 + … + m = m(m + 1)/2.
    most = min(max_depth, (math.isqrt(8 * max_work + 1) - 1) // 2)
    if len(body) // 3 + 1 <= most:
        return None
    import numpy as np

    is_lt = np.frombuffer(body, np.uint8) == 0x3C
    if int(np.count_nonzero(is_lt)) <= most:  # n start tags at most (bytes.count: 2x slower)
        return None
    depth_bound, work_bound = open_bound(body, is_lt)
    if depth_bound <= max_depth and work_bound <= max_work:
        return None
    low = body.lower()
    text = strip_raw_text(low)
    found = _tags_fast(text)
    names, inverse, is_end = found if found is not None else _tags_regex(text)
    if not len(inverse):
        return None
    name_step = np.array([0 if name in _VOID else 1 for name in names], dtype=np.int64)
    token_step = np.where(is_end, -1, name_step[inverse])
    if int((token_step > 0).sum()) <= most:  # the non-void start tags bound depth and work
        return None
    token_element = inverse
    # Each element name's open count is a walk floored at 0 (a stray end tag does nothing):
    # floored = S - min(0, running min of S), S its prefix sum, computed per name in one pass
    # by sorting the tags by name (stable) and offsetting each name's sums below the last.
    order = np.argsort(token_element, kind="stable")
    group = token_element[order]
    steps = token_step[order]
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    sums = np.cumsum(steps)
    before = np.repeat(np.r_[0, sums[starts[1:] - 1]], np.diff(np.r_[starts, len(steps)]))
    walk = sums - before
    big = 4 * len(steps) + 4
    rank = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(steps)]))
    running_min = np.minimum.accumulate(walk - rank * big) + rank * big
    floored = walk - np.minimum(running_min, 0)
    change = np.diff(np.r_[0, floored])
    change[starts] = floored[starts]
    depth = np.empty_like(change)
    depth[order] = change
    depth = np.cumsum(depth)  # the estimated open-element depth after each tag, in page order
    max_depth_seen = int(depth.max())
    if max_depth_seen > max_depth:
        return f"nesting depth over {max_depth} (estimated {max_depth_seen})"
    work = int(depth[token_step > 0].sum())
    if work > max_work:
        return f"tree-building work over {max_work} (estimated {work})"
    return None


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
    return _largest_srcset(srcset)[0]


def _largest_srcset(srcset: str) -> tuple[Optional[str], tuple[int, float]]:
    """(URL, (is-width, size)) of the largest URL-like candidate of a srcset."""
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
        if not url or not url_like(url):
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
            # a width must be > 0 and a density >= 0, both finite (the spec drops the candidate:
            # `-5w`, `1e400w` or `NaNx` must not win); other junk tokens are let pass
            if not (0 < key[1] < math.inf or (key[0] == 0 and key[1] == 0)):
                key = None
                break
        if key is not None and key > best_key:
            best_url, best_key = url, key
    return best_url, best_key


# Characters a URL reference in an attribute never holds unescaped (the value is then JSON, a
# template or markup that a lazy loader's script reads, not a URL).
_NOT_IN_URL = re.compile(r'[\s"<>{}`\\^|]')


def url_like(value: str) -> bool:
    """Whether an attribute value parses as one URL reference: no whitespace inside, none of
    `"<>{}\\^|` and a backtick, and not rejected by urlsplit (`{"default":"//img…"}` in a
    `data-src` is JSON, not a URL)."""
    if not value or _NOT_IN_URL.search(value):
        return False
    try:
        urlsplit(value)
    except ValueError:
        return False
    return True


def choose_image_ref(attrs: dict) -> Optional[tuple[str, str]]:
    """(reference, attribute name) of an `<img>`'s image: data-src-like, else src, else srcset.
    A lazy-load attribute counts only when it parses as a URL (or as a srcset, whose largest
    candidate is taken): lazy loaders also keep JSON and templates there."""
    for name in LAZY_ATTRIBUTES:
        value = attrs.get(name)
        if value and value.strip():
            value = value.strip()
            if url_like(value):
                return value, name
            url = largest_srcset_candidate(value) if "," in value or " " in value else None
            if url:
                return url, name
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
    has_picture = tree.css_first("picture") is not None
    for node in tree.css("img"):
        attrs = node.attributes
        chosen = None
        if has_picture:
            parent = node.parent
            if parent is not None and parent.tag == "picture":
                chosen = picture_choice(
                    [c.attributes for c in parent.iter() if c.tag == "source"], attrs)
        if chosen is None:
            chosen = choose_image_ref(attrs)
        if chosen is None:
            continue
        images.append(ImageRef(chosen[0], chosen[1], _attr(attrs, "alt"), _attr(attrs, "title")))
    return PageImages(base_href, images)


def picture_choice(sources: list[dict], img_attrs: dict) -> Optional[tuple[str, str]]:
    """(URL, "picture") for an `<img>` inside `<picture>` when one of its `<source>` srcsets
    has a candidate larger than the img's own choice (its largest srcset candidate, or its src
    as 1x): the picture shows the larger image, as the browser of LAION's crawler would. On a
    tie the img's own choice stays (every browser can show it); None then."""
    best_url, best_key = None, (-1, -1.0)
    for attrs in sources:
        for name in _SRCSET_ATTRIBUTES:
            value = attrs.get(name)
            if value and value.strip():
                url, key = _largest_srcset(value)
                if url is not None and key > best_key:
                    best_url, best_key = url, key
    if best_url is None:
        return None
    own = choose_image_ref(img_attrs)
    own_key = (0, 1.0)
    if own is not None and own[1] in _SRCSET_ATTRIBUTES:
        own_key = _largest_srcset(img_attrs[own[1]])[1]
    if best_key > own_key:
        return best_url, "picture"
    return None


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
        soup = BeautifulSoup(html_text, "lxml", parse_only=SoupStrainer(["img", "base", "picture", "source"]))
    base_href = None
    for node in soup.find_all("base"):
        if node.get("href") is not None:
            base_href = node.get("href")
            break
    images = []
    for node in soup.find_all("img"):
        attrs = {k.lower(): (" ".join(v) if isinstance(v, list) else v) for k, v in node.attrs.items()}
        chosen = None
        parent = node.parent
        while parent is not None and parent.name == "source":  # lxml's HTML4 parser nests in <source>
            parent = parent.parent
        if parent is not None and parent.name == "picture":
            chosen = picture_choice([{k.lower(): (" ".join(v) if isinstance(v, list) else v)
                                      for k, v in c.attrs.items()}
                                     for c in parent.find_all("source")], attrs)
        if chosen is None:
            chosen = choose_image_ref(attrs)
        if chosen is None:
            continue
        images.append(ImageRef(chosen[0], chosen[1], attrs.get("alt"), attrs.get("title")))
    return PageImages(base_href, images)
