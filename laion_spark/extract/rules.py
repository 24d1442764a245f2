"""LAION-5B's candidate rules, each driven by `ExtractConfig`, plus language id and the uid.

A reference (`<img>` attribute or WAT link) becomes a candidate when, after resolving against the
page's base: the scheme is http(s) (so `data:` and `javascript:` go), the URL has no dropped
extension (`.svg`, `.gif`), the hostname is at most 60 characters, and the alt text has at least
5 characters after whitespace normalisation. Each rejection has a reason, counted per file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urljoin, urlsplit

import mmh3

from laion_spark.config import ExtractConfig

# Reasons a reference is not a candidate (counted per file, in the `extract_files.drops` column).
DROP_NO_ALT = "missing_alt"
DROP_SHORT_ALT = "short_alt"
DROP_SCHEME = "scheme"
DROP_EXTENSION = "extension"
DROP_HOSTNAME = "long_hostname"
DROP_URL_LENGTH = "long_url"
DROP_INVALID_URL = "invalid_url"


def normalise_text(text: Optional[str]) -> str:
    """Whitespace normalisation, as LAION and the demo ground truth do: `" ".join(text.split())`."""
    return " ".join(text.split()) if text else ""


# What is stripped from both ends of a `<base href>`: C0 controls and space (the URL parser's
# rule) and any other whitespace (as before: `str.strip()`).
_BASE_STRIP = "".join(c for c in map(chr, range(0x3001)) if ord(c) <= 0x20 or c.isspace())


def resolve_base(page_url: str, base_href: Optional[str]) -> str:
    """The base URL of a page: `<base href>` resolved against the page URL, when it is usable
    (not `javascript:` or `data:`, looked for as the URL parser reads the value: with tab, LF
    and CR removed and C0 controls and spaces stripped, so `java\tscript:` is one)."""
    if base_href is not None:
        href = base_href
        if "\t" in href or "\n" in href or "\r" in href:
            href = href.replace("\t", "").replace("\n", "").replace("\r", "")
        href = href.strip(_BASE_STRIP)
        if href and not href.lower().startswith(("javascript:", "data:")):
            try:
                return urljoin(page_url, href)
            except ValueError:
                pass
    return page_url


def uid_of(url: str, text: str) -> int:
    """LAION's `hash`: the first signed 64-bit half of MurmurHash3 x64-128 of url + text."""
    return mmh3.hash64(url + text)[0]


# An absolute http(s) URL (any case) and its netloc: the common case, which needs no urljoin.
# A relative reference that urljoin resolves by plain concatenation: a path (absolute or
# relative, not network-path "//") whose segments do not start with "." (no dot segments) and
# hold no ";" (params), ":" (a scheme), "#", "\\", controls or spaces, then an optional
# non-empty query. Anything else goes through urljoin.
_SEGMENT = r"[^\x00-\x20\x7f#;:?/.\\][^\x00-\x20\x7f#;:?/\\]*"
_SIMPLE_RELATIVE = re.compile(
    rf"(?=[^?])/?(?:{_SEGMENT}/)*(?:{_SEGMENT})?(?:\?[^\x00-\x20\x7f#]+)?").fullmatch

# The hostname is the netloc after its last "@" and before ":" (as urlsplit reads it); an IPv6
# literal ("[") goes the urlsplit way.
ABSOLUTE_HTTP = re.compile(r"[hH][tT][tT][pP][sS]?://(?=[^/?#\[]*(?:[/?#]|\Z))(?:[^/?#]*@)?([^/?#@:]*)").match


@dataclass
class Accepted:
    url: str
    text: str


class CandidateRules:
    """Applies the configured rules; keeps the lower-cased lists once per task, not per image."""

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        self.schemes = {s.lower() for s in cfg.allowed_schemes}
        self.extensions = [e.lower() for e in cfg.drop_extensions]
        self.fast_http = {"http", "https"} <= self.schemes
        self.max_hostname_length = cfg.max_hostname_length
        self._base_key: Optional[str] = None
        self._base_split: Optional[tuple] = None
        # one C call for "does the lower-cased URL contain any dropped extension"
        self.any_extension = re.compile("|".join(map(re.escape, self.extensions))).search \
            if self.extensions else (lambda _url: None)
        self.max_url_length = cfg.max_url_length

    def check_url(self, base: str, ref: str) -> tuple[Optional[str], Optional[str]]:
        """(absolute URL, None) when the reference is a usable image URL, else (None, reason)."""
        ref = ref.strip()
        m = ABSOLUTE_HTTP(ref) if self.fast_http else None
        if m is not None:
            # Already absolute: urljoin would hand it back unchanged; the regex read the host.
            url = ref
            hostname = m.group(1).lower()
        elif ref[:11].lower().startswith(("data:", "javascript:")):
            return None, DROP_SCHEME
        elif self.fast_http and _SIMPLE_RELATIVE(ref) is not None and self._base_of(base) is not None:
            # A plain relative reference: urljoin would give base origin (+ directory) + ref.
            scheme, origin, directory, hostname = self._base_split
            if scheme not in self.schemes:
                return None, DROP_SCHEME
            url = origin + ref if ref[0] == "/" else origin + directory + ref
        else:
            try:
                url = urljoin(base, ref)
                parts = urlsplit(url)
                hostname = parts.hostname or ""
            except ValueError:  # e.g. an invalid IPv6 literal "http://[::1"
                return None, DROP_INVALID_URL
            if parts.scheme.lower() not in self.schemes:
                return None, DROP_SCHEME
        if not hostname:
            return None, DROP_INVALID_URL
        if self.extensions and self.any_extension(url.lower()):
            return None, DROP_EXTENSION
        if len(hostname) > self.max_hostname_length:
            return None, DROP_HOSTNAME
        if len(url) > self.max_url_length:
            return None, DROP_URL_LENGTH
        return url, None

    def _base_of(self, base: str) -> Optional[tuple]:
        """(scheme, origin, directory, hostname) of a base URL that urljoin would use verbatim
        (http(s), a host, a path with no `;`, `//` or dot segments), else None. One per page."""
        if base is not self._base_key:
            self._base_key = base
            self._base_split = None
            try:
                parts = urlsplit(base)
                hostname = parts.hostname
            except ValueError:
                return None
            path = parts.path
            if (parts.scheme in ("http", "https") and parts.netloc and hostname
                    and ";" not in path and "//" not in path and "/." not in path
                    and (not path or path[0] == "/")):
                self._base_split = (parts.scheme, f"{parts.scheme}://{parts.netloc}",
                                    path[:path.rfind("/") + 1] or "/", hostname)
        return self._base_split

    def check_text(self, alt: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """(normalised text, None) when the alt text is long enough, else (None, reason)."""
        if alt is None:
            return None, DROP_NO_ALT
        text = normalise_text(alt)
        if len(text) < self.cfg.min_text_length:
            return None, DROP_SHORT_ALT
        if len(text) > self.cfg.max_text_length:
            text = text[: self.cfg.max_text_length]
        return text, None


# Per file; the benchmark sets it to 0 to show the cost when no alt text repeats.
LANGUAGE_CACHE_SIZE = 100_000


class LanguageIdentifier:
    """gcld3 on the alt text, grouped as LAION-5B did: `en` (reliable English), `multi` (reliable,
    another language), `nolang` (not reliable). One CLD3 model per Python worker. The module
    comes from the `cld3-py` wheels (the same CLD3 and API as `gcld3`, whose source build needs
    protobuf; bit-identical labels on the real alt texts, ~25 % faster: 27 vs 36 µs a text);
    tests/test_extract_language.py pins the labels."""

    _detector = None

    def __init__(self, min_prob: float = 0.5):
        self.min_prob = min_prob
        if LanguageIdentifier._detector is None:
            import gcld3

            LanguageIdentifier._detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        self.detector = LanguageIdentifier._detector
        self._cache: dict[str, tuple[str, float, str]] = {}

    def identify(self, text: str) -> tuple[str, float, str]:
        """(language code, probability, group)."""
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        res = self.detector.FindLanguage(text=text)
        code = res.language or "und"
        prob = float(res.probability)
        reliable = bool(res.is_reliable) and prob >= self.min_prob and code != "und"
        group = ("en" if code == "en" else "multi") if reliable else "nolang"
        out = (code, prob, group)
        if len(self._cache) < LANGUAGE_CACHE_SIZE:  # alt texts repeat (logos, "image", site names)
            self._cache[text] = out
        return out
