"""LAION-5B's candidate rules, each driven by `ExtractConfig`, plus language id and the uid.

A reference (`<img>` attribute or WAT link) becomes a candidate when, after resolving against the
page's base: the scheme is http(s) (so `data:` and `javascript:` go), the URL has no dropped
extension (`.svg`, `.gif`), the hostname is at most 60 characters, and the alt text has at least
5 characters after whitespace normalisation. Each rejection has a reason, counted per file.
"""
from __future__ import annotations

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


def resolve_base(page_url: str, base_href: Optional[str]) -> str:
    """The base URL of a page: `<base href>` resolved against the page URL, when it is usable."""
    if base_href is not None:
        href = base_href.strip()
        if href and not href.lower().startswith(("javascript:", "data:")):
            try:
                return urljoin(page_url, href)
            except ValueError:
                pass
    return page_url


def uid_of(url: str, text: str) -> int:
    """LAION's `hash`: the first signed 64-bit half of MurmurHash3 x64-128 of url + text."""
    return mmh3.hash64(url + text)[0]


def _first_of(text: str, chars: str, start: int) -> int:
    """Index of the first of `chars` in text[start:], or len(text)."""
    end = len(text)
    for c in chars:
        i = text.find(c, start, end)
        if i >= 0:
            end = i
    return end


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

    def check_url(self, base: str, ref: str) -> tuple[Optional[str], Optional[str]]:
        """(absolute URL, None) when the reference is a usable image URL, else (None, reason)."""
        ref = ref.strip()
        low = ref[:11].lower()
        if low.startswith(("data:", "javascript:")):
            return None, DROP_SCHEME
        hostname = None
        if low.startswith(("http://", "https://")) and self.fast_http:
            # Already absolute: urljoin would hand it back unchanged; read the host by hand.
            url = ref
            scheme_end = url.index("//") + 2
            slash = _first_of(url, "/?#", scheme_end)
            netloc = url[scheme_end:slash]
            if "[" not in netloc:
                hostname = netloc.rpartition("@")[2].partition(":")[0].lower()
        if hostname is None:
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
        low_url = url.lower()
        for ext in self.extensions:
            if ext in low_url:
                return None, DROP_EXTENSION
        if len(hostname) > self.cfg.max_hostname_length:
            return None, DROP_HOSTNAME
        if len(url) > self.cfg.max_url_length:
            return None, DROP_URL_LENGTH
        return url, None

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


class LanguageIdentifier:
    """gcld3 on the alt text, grouped as LAION-5B did: `en` (reliable English), `multi` (reliable,
    another language), `nolang` (not reliable). One CLD3 model per Python worker."""

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
        if len(self._cache) < 100_000:  # alt texts repeat a lot (logos, "image", site names)
            self._cache[text] = out
        return out
