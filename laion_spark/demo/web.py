"""A seeded demo web: a few hundred multilingual pages with the quirks of real HTML, the images
they show, gzipped WARC files of the pages, and a ground truth that says what each stage should
find.

The whole pipeline runs on it with no internet: extract reads the WARCs, download fetches the
images from `DemoWebServer` on 127.0.0.1, score trains on (image, caption) pairs where the ground
truth knows which alt texts really describe their image.

Rules the ground truth follows (so the extractor's tests can compare against it):
  - `url`: the image URL an extractor should produce, resolved against the page URL or the
    page's `<base href>` with `urllib.parse.urljoin`, after stripping surrounding whitespace.
    `data-src` (lazy loading) wins over `src` when present; an `<img>` with only `srcset` gives
    its largest candidate. `src_attr` is the parsed value of the attribute `url` came from
    (`url_source`).
  - `alt`: the alt attribute's value after entity decoding and whitespace normalisation
    (`" ".join(value.split())`); None when the attribute is missing.
  - `extractable`: LAION's filters: http(s) URL, no ".svg"/".gif" in it, alt of >= 5 characters.
  - `matches`: the alt text describes the image served at `url` (false when nothing is there).
  - `<img>` inside HTML comments or `<script>` are not images of the page and are not listed.

ground_truth.json holds: seed, base_url, pages (url, language, charset as a Python codec name,
charset_declared_in, content_type as served and archived, site_path, n_images, warc_file,
quirks), images (one per <img> in document order: page_url, url, url_source, src_attr, alt,
alt_kind, language of the alt, scene, matches, expected_download, extractable, drop_reason,
sha256/n_bytes/width/height of what `url` serves, final_url after a redirect), failing_urls by
outcome, other_records (WARC responses that are not pages: 301, 404, robots.txt), warc_records
(per file, every record's type and WARC-Target-URI in order) and stats.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import os
import posixpath
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from html.entities import codepoint2name
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from laion_spark.demo import text as T
from laion_spark.demo.scenes import Scene, describe_scene, different_scene, random_scene, render_scene, scene_svg
from laion_spark.demo.server import RULES_FILE, DemoWebServer, serve_demo_web

__all__ = ["DemoWeb", "DemoWebServer", "generate_demo_web", "load_ground_truth", "normalize_alt", "serve_demo_web"]

log = logging.getLogger(__name__)

LANGUAGE_SHARES: dict[str, float] = {"en": 0.50, "de": 0.15, "fr": 0.13, "es": 0.12, "ja": 0.10}
MIN_IMAGE_BYTES = 5000  # LAION drops images under 5 KB
MIN_ALT_CHARS = 5  # LAION drops alt texts shorter than this
URL_RULE = ("urljoin(base, attr.strip()) where base is <base href> (resolved against the page URL) or the page URL; "
            "data-src wins over src; an img with only srcset gives its largest candidate")
EXPECTED_DOWNLOADS = ("success", "too_small", "http_404", "timeout", "bad_bytes", "unsupported_format", "not_fetched")

# Charsets per page language with their weights; the ground truth uses these Python codec names.
_CHARSETS: dict[str, list[tuple[str, float]]] = {
    "en": [("utf-8", 0.88), ("windows-1252", 0.12)],
    "de": [("utf-8", 0.4), ("iso-8859-1", 0.3), ("windows-1252", 0.3)],
    "fr": [("utf-8", 0.5), ("windows-1252", 0.3), ("iso-8859-1", 0.2)],
    "es": [("utf-8", 0.6), ("iso-8859-1", 0.4)],
    "ja": [("utf-8", 0.4), ("shift_jis", 0.4), ("euc-jp", 0.2)],
}
# How the charset is spelled in headers and <meta>: real pages mix the case.
_CHARSET_LABELS: dict[str, list[str]] = {
    "utf-8": ["utf-8", "UTF-8"], "windows-1252": ["windows-1252", "Windows-1252"],
    "iso-8859-1": ["ISO-8859-1", "iso-8859-1"], "shift_jis": ["Shift_JIS", "shift_jis"], "euc-jp": ["EUC-JP", "euc-jp"],
}
_PAGE_PATTERNS: dict[str, list[str]] = {
    "en": ["/en/articles/{slug}.html", "/en/gallery/{n}/", "/blog/{y}/{m:02d}/{slug}/", "/en/shop/item-{n}.html",
           "/en/learn/shapes/{slug}.htm"],
    "de": ["/de/artikel/{slug}.html", "/de/galerie/seite-{n}.html", "/de/lernen/{slug}/"],
    "fr": ["/fr/articles/{slug}.html", "/fr/blog/{y}/{m:02d}/{slug}/"],
    "es": ["/es/articulos/{slug}.html", "/es/galeria/pagina-{n}.html"],
    "ja": ["/ja/kiji/{n}.html", "/ja/gallery/{n}/"],
}
_IMAGE_SIZES = [(320, 240), (400, 300), (240, 320), (256, 256), (360, 240), (300, 300)]
_ASSET_KINDS: list[tuple[str, float]] = [
    ("jpeg", 0.60), ("png", 0.07), ("webp", 0.06), ("thumb", 0.04), ("gif", 0.03), ("svg", 0.02), ("missing", 0.05),
    ("bad_html", 0.02), ("bad_garbage", 0.015), ("redirect", 0.03), ("data_uri", 0.02), ("javascript", 0.01),
]
_ALT_KINDS: list[tuple[str, float]] = [
    ("scene_caption", 0.57), ("other_scene_caption", 0.15), ("generic", 0.11), ("missing", 0.07), ("empty", 0.05),
    ("short", 0.06),
]
_BLANK_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_BLANK_GIF_URI = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
_EPOCH = datetime(2024, 3, 1, tzinfo=timezone.utc)


@dataclass
class DemoWeb:
    """Where a generated demo web lives and which base URL its pages and images use."""

    out_dir: Path
    base_url: str
    warc_paths: list[Path]
    ground_truth_path: Path
    site_dir: Path
    seed: int = 0

    def ground_truth(self) -> dict[str, Any]:
        return load_ground_truth(self.ground_truth_path)


def load_ground_truth(path: Path | str) -> dict[str, Any]:
    """Read ground_truth.json (a DemoWeb's, or any path to one)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def normalize_alt(value: str) -> str:
    """Whitespace normalisation of an alt text, as the candidates table stores it."""
    return " ".join(value.split())


def _weighted(rng: random.Random, choices: list[tuple[str, float]]) -> str:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


# --------------------------------------------------------------------------------------
# Plan: which pages, which images, which alt texts


@dataclass
class _Asset:
    """One image URL on the demo host and what answers it."""

    asset_id: int
    kind: str
    scene: Scene | None
    size: tuple[int, int]
    path: str | None = None  # URL path (None for data:/javascript: URLs)
    literal_url: str | None = None  # data: or javascript: URL
    variants: dict[str, str] = field(default_factory=dict)  # "2x" / "webp" -> URL path
    variant_files: dict[str, tuple[str, int]] = field(default_factory=dict)  # variant -> (sha256, n_bytes)
    redirect_target: str | None = None
    content_type: str | None = None  # served Content-Type when not the extension's
    sha256: str | None = None
    n_bytes: int | None = None
    image_format: str | None = None
    pages: list[int] = field(default_factory=list)

    @property
    def expected_download(self) -> str:
        return {"thumb": "too_small", "svg": "unsupported_format", "missing": "http_404", "bad_html": "bad_bytes",
                "bad_garbage": "bad_bytes", "slow": "timeout", "data_uri": "not_fetched",
                "javascript": "not_fetched"}.get(self.kind, "success")

    @property
    def reusable(self) -> bool:
        return self.kind in ("jpeg", "png", "webp", "thumb", "gif", "logo")

    @property
    def shows_scene(self) -> bool:
        """Whether a client that fetches the URL gets a picture of `scene`."""
        return self.scene is not None and self.kind not in ("missing", "bad_html", "bad_garbage", "javascript")


@dataclass
class _Slot:
    """One <img> of a page."""

    asset: _Asset
    alt_kind: str
    alt_text: str | None
    alt_language: str


@dataclass
class _Page:
    index: int
    language: str
    path: str
    charset: str
    declared_in: list[str]  # "bom", "header", "meta", "meta_http_equiv"
    slots: list[_Slot] = field(default_factory=list)
    quirks: set[str] = field(default_factory=set)

    @property
    def site_path(self) -> str:
        return self.path.lstrip("/") + ("index.html" if self.path.endswith("/") else "")


class _Planner:
    """Decides pages, assets and alt texts from one seeded RNG, before anything is drawn."""

    def __init__(self, seed: int, n_pages: int) -> None:
        self.seed = seed
        self.n_pages = n_pages
        self.rng = random.Random(f"demo-web:{seed}:plan")
        self.assets: list[_Asset] = []
        self.logo = self._new_asset("logo", scene=Scene("star", "blue", "white", 1), size=(160, 120))
        self.logo.path = "/static/logo.png"

    def _new_asset(self, kind: str, scene: Scene | None = None, size: tuple[int, int] | None = None) -> _Asset:
        asset = _Asset(len(self.assets), kind, scene or random_scene(self.rng), size or self.rng.choice(_IMAGE_SIZES))
        self.assets.append(asset)
        return asset

    def plan(self) -> list[_Page]:
        languages = self._languages()
        pages = [self._plan_page(i, lang) for i, lang in enumerate(languages)]
        self._add_slow_images(pages)
        for asset in self.assets:
            self._assign_path(asset)
        paths = [p for a in self.assets for p in (a.path, a.redirect_target, *a.variants.values()) if p]
        if len(paths) != len(set(paths)):
            raise AssertionError("two demo images got the same URL path")
        return pages

    def _languages(self) -> list[str]:
        counts = {lang: round(share * self.n_pages) for lang, share in LANGUAGE_SHARES.items()}
        counts["en"] += self.n_pages - sum(counts.values())
        languages = [lang for lang, n in counts.items() for _ in range(n)]
        self.rng.shuffle(languages)
        return languages

    def _plan_page(self, index: int, lang: str) -> _Page:
        rng = self.rng
        pattern = rng.choice(_PAGE_PATTERNS[lang])
        slug = f"{rng.choice(T.SLUG_WORDS[lang])}-{rng.choice(T.SLUG_WORDS[lang])}-{index}"
        path = pattern.format(slug=slug, n=index, y=rng.choice((2019, 2021, 2023)), m=rng.randint(1, 12))
        charset = _weighted(rng, _CHARSETS[lang])
        page = _Page(index, lang, path, charset, self._declaration(charset))
        if rng.random() < 0.35:
            page.slots.append(_Slot(self.logo, "generic", T.LOGO_ALTS[lang], lang))
            self.logo.pages.append(index)
        for _ in range(rng.randint(2, 5)):
            page.slots.append(self._plan_slot(page))
        return page

    def _declaration(self, charset: str) -> list[str]:
        rng = self.rng
        if charset == "utf-8":
            return rng.choices([["header", "meta"], ["meta"], ["meta_http_equiv"], ["header"], [], ["bom"]],
                               weights=[0.35, 0.25, 0.1, 0.15, 0.1, 0.05])[0]
        return rng.choices([["header", "meta"], ["header", "meta_http_equiv"], ["header"], ["meta"], ["meta_http_equiv"]],
                           weights=[0.25, 0.15, 0.25, 0.2, 0.15])[0]

    def _plan_slot(self, page: _Page) -> _Slot:
        rng = self.rng
        reusable = [a for a in self.assets if a.reusable and a.kind != "logo" and page.index not in a.pages]
        if reusable and rng.random() < 0.12:
            asset = rng.choice(reusable)
        else:
            asset = self._new_asset(_weighted(rng, _ASSET_KINDS))
            if asset.kind == "jpeg" and rng.random() < 0.2:
                asset.variants["2x"] = ""
            if asset.kind == "jpeg" and rng.random() < 0.06:
                asset.variants["webp"] = ""
            if asset.kind in ("jpeg", "png") and rng.random() < 0.05:
                asset.content_type = rng.choice(("application/octet-stream", "binary/octet-stream"))
        asset.pages.append(page.index)
        alt_language = page.language
        if page.language != "en" and rng.random() < 0.08:
            alt_language = "en"
        alt_kind = _weighted(rng, _ALT_KINDS)
        return _Slot(asset, alt_kind, self._alt_text(alt_kind, asset.scene, alt_language), alt_language)

    def _alt_text(self, alt_kind: str, scene: Scene | None, lang: str) -> str | None:
        rng = self.rng
        if alt_kind == "scene_caption":
            assert scene is not None
            caption = describe_scene(scene, lang, rng)
            return rng.choice(T.CAPTION_PREFIXES[lang]) + caption if rng.random() < 0.12 else caption
        if alt_kind == "other_scene_caption":
            assert scene is not None
            return describe_scene(different_scene(scene, rng), lang, rng)
        if alt_kind == "generic":
            return rng.choice(T.GENERIC_ALTS[lang])
        if alt_kind == "short":
            return rng.choice(T.SHORT_ALTS[lang])
        if alt_kind == "empty":
            return rng.choice(("", " ", "  "))
        return None

    def _add_slow_images(self, pages: list[_Page]) -> None:
        """A few images that never finish: enough to exercise timeouts, few enough to keep a
        downloader run short."""
        n_slow = max(1, self.n_pages // 80)
        for page in self.rng.sample(pages, k=min(n_slow, len(pages))):
            asset = self._new_asset("slow", size=(320, 240))
            asset.pages.append(page.index)
            page.slots.insert(self.rng.randint(0, len(page.slots)), _Slot(
                asset, "scene_caption", describe_scene(asset.scene, page.language, self.rng), page.language))  # type: ignore[arg-type]

    def _assign_path(self, asset: _Asset) -> None:
        rng = random.Random(f"demo-web:{self.seed}:path:{asset.asset_id}")
        digest = hashlib.sha1(f"{self.seed}:{asset.asset_id}".encode()).hexdigest()[:12]
        word = rng.choice(T.SLUG_WORDS["en"])
        k = asset.asset_id
        kind = asset.kind
        if kind == "logo":
            return
        if kind == "jpeg":
            asset.path = rng.choice([f"/img/{digest}.jpg", f"/images/{word}/{word}-{k}.jpg",
                                     f"/wp-content/uploads/{rng.choice((2020, 2022))}/{rng.randint(1, 12):02d}/{word}-{k}.jpeg",
                                     f"/media/{digest[:2]}/{digest[2:]}.JPG"])
        elif kind == "png":
            asset.path = rng.choice([f"/media/{digest[:2]}/{digest[2:]}.png", f"/images/{word}/{word}-{k}.png"])
        elif kind == "webp":
            asset.path = f"/static/pics/{word}-{k}.webp"
        elif kind == "thumb":
            asset.path = f"/img/thumbs/{digest}_t.jpg"
            asset.size = (48, 36)
        elif kind == "gif":
            asset.path = f"/img/anim/{word}-{k}.gif"
        elif kind == "svg":
            asset.path = f"/img/vector/{word}-{k}.svg"
        elif kind == "missing":
            asset.path = f"/wp-content/uploads/2019/{rng.randint(1, 12):02d}/{word}-{k}-removed.jpg"
        elif kind in ("bad_html", "bad_garbage"):
            asset.path = f"/img/{digest}.jpg"
        elif kind == "redirect":
            asset.path = f"/go/{digest}.jpg"
            asset.redirect_target = f"/img/r/{digest}.jpg"
        elif kind == "slow":
            asset.path = f"/cdn/slow/{digest}.jpg"
        elif kind == "javascript":
            asset.literal_url = "javascript:void(0)"
        elif kind == "data_uri":
            asset.size = (16, 12)
        else:
            raise AssertionError(kind)
        if asset.path is not None:
            stem, ext = posixpath.splitext(asset.path)
            if "2x" in asset.variants:
                asset.variants["2x"] = f"{stem}@2x{ext}"
            if "webp" in asset.variants:
                asset.variants["webp"] = f"{stem}.webp"


# --------------------------------------------------------------------------------------
# Images


def _encode(image: Image.Image, fmt: str, rng: random.Random) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, "JPEG", quality=rng.choice((85, 90, 92)), progressive=rng.random() < 0.2)
    elif fmt == "PNG":
        image.save(out, "PNG", compress_level=1)
    elif fmt == "WEBP":
        image.save(out, "WEBP", quality=85, method=0)
    elif fmt == "GIF":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(out, "GIF")
    else:
        raise ValueError(fmt)
    return out.getvalue()


_FORMAT_BY_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF"}


def _write_assets(assets: list[_Asset], site_dir: Path, seed: int) -> None:
    """Draw and write every asset (and its variants) under site_dir, or build its data: URL."""
    for asset in assets:
        rng = random.Random(f"demo-web:{seed}:render:{asset.asset_id}")
        scene = asset.scene
        assert scene is not None
        body: bytes | None
        if asset.kind in ("missing", "javascript"):
            continue
        if asset.kind == "data_uri":
            png = _encode(render_scene(scene, (16, 12), rng, noise=0), "PNG", rng)
            asset.literal_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            continue
        if asset.kind == "bad_html":
            body = (b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
                    b"<body><h1>Forbidden</h1><p>Hotlinking of images is not allowed.</p></body></html>\n")
            asset.image_format = None
        elif asset.kind == "bad_garbage":
            body = b"\x00\x01GARBAGE" + rng.randbytes(rng.randint(3000, 9000))
        elif asset.kind == "svg":
            body = scene_svg(scene, asset.size, rng).encode("utf-8")
            asset.image_format = "SVG"
        elif asset.kind == "thumb":
            body = _encode(render_scene(scene, asset.size, rng, noise=0), "JPEG", rng)
            asset.image_format = "JPEG"
            if len(body) >= MIN_IMAGE_BYTES:
                raise AssertionError(f"thumbnail of {len(body)} bytes is not under {MIN_IMAGE_BYTES}")
        else:
            fmt = _FORMAT_BY_EXT[posixpath.splitext(asset.redirect_target or asset.path or "")[1].lower()]
            noise = 0 if fmt == "GIF" else 10
            state = rng.getstate()
            body = _encode(render_scene(scene, asset.size, rng, noise=noise), fmt, rng)
            asset.image_format = fmt
            for variant, variant_path in asset.variants.items():
                rng.setstate(state)  # same layout as the main image
                size = (asset.size[0] * 2, asset.size[1] * 2) if variant == "2x" else asset.size
                variant_fmt = "WEBP" if variant == "webp" else fmt
                variant_body = _encode(render_scene(scene, size, rng), variant_fmt, rng)
                asset.variant_files[variant] = (hashlib.sha256(variant_body).hexdigest(), len(variant_body))
                _write_file(site_dir, variant_path, variant_body)
            if fmt in ("JPEG", "PNG", "WEBP") and len(body) < MIN_IMAGE_BYTES:
                raise AssertionError(f"image {asset.path} is only {len(body)} bytes")
        asset.sha256 = hashlib.sha256(body).hexdigest()
        asset.n_bytes = len(body)
        _write_file(site_dir, asset.redirect_target or asset.path, body)  # type: ignore[arg-type]


def _write_file(site_dir: Path, url_path: str, body: bytes) -> None:
    target = site_dir / url_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)


# --------------------------------------------------------------------------------------
# HTML


@dataclass
class _TagStyle:
    upper: bool = False
    self_close: bool = False
    raw_ampersand: bool = False


class _PageWriter:
    """Writes one page's HTML with its quirks, and the ground-truth entries of its images."""

    def __init__(self, page: _Page, pages: list[_Page], base_url: str, seed: int) -> None:
        self.page = page
        self.pages = pages
        self.base_url = base_url
        self.host = urlsplit(base_url).netloc
        self.page_url = base_url + page.path
        self.rng = random.Random(f"demo-web:{seed}:page:{page.index}")
        self.images: list[dict[str, Any]] = []
        self.header_charset_label: str | None = None
        rng = self.rng
        self.style = _TagStyle(upper=rng.random() < 0.08, self_close=rng.random() < 0.2)
        self.broken = rng.random() < 0.2
        self.style.raw_ampersand = self.broken and rng.random() < 0.5
        self.base_href: str | None = None
        if rng.random() < 0.1:
            self.base_href = rng.choice([f"{base_url}/static/", "/images/", f"{base_url}/wp-content/uploads/"])
            page.quirks.add("base_href")
        self.effective_base = urljoin(self.page_url, self.base_href) if self.base_href else self.page_url

    # -- URLs ---------------------------------------------------------------------------

    def _reference(self, url_path: str, plain: bool = False) -> tuple[str, str]:
        """How the HTML spells a link to url_path (absolute, root-relative, relative, ...), and
        the absolute URL it resolves to. plain: no query string or padding (for srcset)."""
        rng = self.rng
        absolute = self.base_url + url_path
        forms = ["root_relative", "absolute", "relative", "protocol_relative", "query", "padded"]
        weights = [0.33, 0.27, 0.26, 0.05, 0.05, 0.04]
        if self.base_href is not None:
            weights[2] = 0.8  # a <base href> matters through relative references
        form = rng.choices(forms[:4] if plain else forms, weights=weights[:4] if plain else weights)[0]
        if form == "root_relative":
            ref = url_path
        elif form == "absolute":
            ref = absolute
            self.page.quirks.add("absolute_url")
        elif form == "relative":
            base_dir = posixpath.dirname(urlsplit(self.effective_base).path) or "/"
            ref = posixpath.relpath(url_path, base_dir)
            if not ref.startswith("..") and rng.random() < 0.3:
                ref = "./" + ref
            self.page.quirks.add("relative_url")
        elif form == "protocol_relative":
            ref = "//" + self.host + url_path
            self.page.quirks.add("protocol_relative_url")
        elif form == "query":
            ref = f"{url_path}?w={rng.choice((320, 640))}&h={rng.choice((240, 480))}"
            self.page.quirks.add("query_string")
        else:
            ref = rng.choice((" ", "\n", "  ")) + url_path + rng.choice((" ", "", "\n"))
            self.page.quirks.add("url_whitespace")
        resolved = urljoin(self.effective_base, ref.strip())
        expected = absolute + (ref.strip()[len(url_path):] if form == "query" else "")
        if resolved != expected:
            raise AssertionError(f"{ref!r} on {self.page_url} resolves to {resolved}, not {expected}")
        return ref, resolved

    # -- tags ---------------------------------------------------------------------------

    def _attr(self, name: str, value: str | None, *, is_url: bool = False, entities: bool = False) -> str:
        name = name.upper() if self.style.upper else name
        if value is None:
            return name
        escaped = value.replace("&", "&amp;") if not (is_url and self.style.raw_ampersand) else value
        escaped = escaped.replace("<", "&lt;").replace(">", "&gt;")
        if entities:
            escaped = "".join(
                (f"&{codepoint2name[ord(c)]};" if ord(c) in codepoint2name and self.rng.random() < 0.5 else f"&#{ord(c)};")
                if ord(c) > 127 else c for c in escaped)
        quote = self.rng.choices(['"', "'", ""], weights=[0.85, 0.1, 0.05])[0]
        if quote == "" and (not escaped or any(c in escaped for c in " \t\n\"'=<>`&")):
            quote = '"'
        if quote == '"':
            escaped = escaped.replace('"', "&quot;")
        elif quote == "'":
            escaped = escaped.replace("'", "&#39;")
            self.page.quirks.add("single_quoted_attributes")
        else:
            self.page.quirks.add("unquoted_attributes")
        return f"{name}={quote}{escaped}{quote}"

    def _tag(self, name: str, attrs: list[str], void: bool = False) -> str:
        name = name.upper() if self.style.upper else name
        joiner = "\n    " if self.rng.random() < 0.1 else " "
        inner = joiner.join([name, *attrs])
        return f"<{inner} />" if void and self.style.self_close else f"<{inner}>"

    def _t(self, name: str) -> str:
        """A plain tag name in the page's case."""
        return name.upper() if self.style.upper else name

    # -- images -------------------------------------------------------------------------

    def _img_markup(self, slot: _Slot) -> str:
        """One image's markup, and its ground-truth entry."""
        rng, asset, quirks = self.rng, slot.asset, self.page.quirks
        attrs: list[str] = []
        url_source = "src"
        if asset.literal_url is not None:
            src_attr = asset.literal_url
            url = src_attr
            attrs.append(self._attr("src", src_attr))
            quirks.add("data_uri" if asset.kind == "data_uri" else "javascript_url")
        else:
            assert asset.path is not None
            lazy = asset.kind in ("jpeg", "png", "webp") and rng.random() < 0.12
            srcset_mode = None
            if "2x" in asset.variants and not lazy:
                srcset_mode = rng.choice(("src+srcset", "src+srcset", "srcset_only"))
            if lazy:
                url_source = "data-src"
                src_attr, url = self._reference(asset.path)
                placeholder = rng.choice((_BLANK_GIF_URI, "/static/blank.gif", None))
                if placeholder is not None:
                    attrs.append(self._attr("src", placeholder, is_url=True))
                attrs.append(self._attr(rng.choice(("data-src", "data-src", "DATA-SRC")), src_attr, is_url=True))
                attrs.append(self._attr("class", "lazyload"))
                quirks.add("data_src_lazy")
            elif srcset_mode is not None:
                w = asset.size[0]
                small, _ = self._reference(asset.path, plain=True)
                large, large_url = self._reference(asset.variants["2x"], plain=True)
                srcset = rng.choice((f"{small} 1x, {large} 2x", f"{small} {w}w, {large} {2 * w}w"))
                if srcset_mode == "srcset_only":  # the largest candidate
                    url_source, src_attr, url = "srcset", srcset, large_url
                    quirks.add("srcset_only")
                else:
                    src_attr, url = self._reference(asset.path)
                    attrs.append(self._attr("src", src_attr, is_url=True))
                    quirks.add("srcset")
                attrs.append(self._attr("srcset", srcset, is_url=True))
                attrs.append(self._attr("sizes", f"(max-width: 600px) 100vw, {w}px"))
            else:
                src_attr, url = self._reference(asset.path)
                attrs.append(self._attr("src", src_attr, is_url=True))
            if asset.kind == "redirect":
                quirks.add("redirect_image")
        alt_value = slot.alt_text
        if alt_value is not None:
            if alt_value.strip() and rng.random() < 0.1:
                alt_value = rng.choice((" ", "\n  ", "\t")) + alt_value.replace(" ", rng.choice(("  ", "\n      ", " \t")), 1) + " "
                quirks.add("whitespace_in_alt")
            entities = any(ord(c) > 127 for c in alt_value) and rng.random() < 0.25
            if entities:
                quirks.add("entities_in_alt")
            alt_html = self._attr("alt", alt_value, entities=entities)
            if rng.random() < 0.3:
                attrs.insert(0, alt_html)
            else:
                attrs.append(alt_html)
        elif rng.random() < 0.3:
            attrs.append(self._attr("title", rng.choice(T.GENERIC_ALTS[slot.alt_language])))
            quirks.add("title_without_alt")
        if asset.size and rng.random() < 0.7:
            attrs += [self._attr("width", str(asset.size[0])), self._attr("height", str(asset.size[1]))]
        if rng.random() < 0.2:
            attrs.append(self._attr("loading", "lazy"))
        if asset.kind == "logo":
            quirks.add("site_logo")
        if len(asset.pages) > 1:
            quirks.add("duplicate_image")
        img = self._tag("img", attrs, void=True)
        self.images.append(self._ground_truth_entry(slot, url, src_attr, url_source, alt_value))
        if "webp" in asset.variants and url_source == "src":
            source = self._tag("source", [self._attr("type", "image/webp"),
                                          self._attr("srcset", self._reference(asset.variants["webp"], plain=True)[0], is_url=True)], void=True)
            quirks.add("picture_source")
            return f"<{self._t('picture')}>{source}{img}</{self._t('picture')}>"
        return img

    def _ground_truth_entry(self, slot: _Slot, url: str, src_attr: str, url_source: str,
                            alt_value: str | None) -> dict[str, Any]:
        asset = slot.asset
        sha256, n_bytes, (width, height) = asset.sha256, asset.n_bytes, asset.size
        if url_source == "srcset":  # the largest candidate: the 2x variant
            sha256, n_bytes = asset.variant_files["2x"]
            width, height = 2 * width, 2 * height
        alt = normalize_alt(alt_value) if alt_value is not None else None
        scheme = urlsplit(url).scheme
        drop_reason = None
        if scheme not in ("http", "https"):
            drop_reason = "javascript_url" if scheme == "javascript" else "data_uri"
        elif ".svg" in url.lower():
            drop_reason = "svg"
        elif ".gif" in url.lower():
            drop_reason = "gif"
        elif alt is None:
            drop_reason = "missing_alt"
        elif not alt:
            drop_reason = "empty_alt"
        elif len(alt) < MIN_ALT_CHARS:
            drop_reason = "short_alt"
        matches = slot.alt_kind == "scene_caption" and asset.shows_scene
        return {
            "page_url": self.page_url,
            "url": url,
            "url_source": url_source,
            "src_attr": src_attr,
            "alt": alt,
            "alt_kind": slot.alt_kind,
            "language": slot.alt_language,
            "scene": asset.scene.to_dict() if asset.scene is not None and asset.shows_scene else None,
            "matches": matches,
            "expected_download": asset.expected_download,
            "extractable": drop_reason is None,
            "drop_reason": drop_reason,
            "asset_id": asset.asset_id,
            "asset_kind": asset.kind,
            "final_url": self.base_url + asset.redirect_target if asset.redirect_target else None,
            "sha256": sha256,
            "n_bytes": n_bytes,
            "image_format": asset.image_format,
            "width": width if asset.shows_scene and asset.kind != "svg" else None,
            "height": height if asset.shows_scene and asset.kind != "svg" else None,
            "content_type": asset.content_type,
        }

    def _decoy(self, where: str) -> str:
        """An <img> that is not part of the page: inside a comment or a script string."""
        slot = self.page.slots[0]
        path = slot.asset.path or "/static/logo.png"
        if where == "comment":
            self.page.quirks.add("img_in_comment")
            return f'<!-- old banner: <img src="{path}" alt="Old banner, removed in 2020"> -->'
        self.page.quirks.add("img_in_script")
        return ("<script>\n  var banner = '<img src=\"" + path + "\" alt=\"Promotional banner\">';\n"
                "  if (window.showBanner) { document.write(banner); }\n</script>")

    # -- page ---------------------------------------------------------------------------

    def render(self) -> str:
        """The page as text (encoding happens later)."""
        rng, page, t = self.rng, self.page, self._t
        lang = page.language
        title = f"{rng.choice(T.TITLES[lang])} - {T.SITE_NAME}"
        label = rng.choice(_CHARSET_LABELS[page.charset])
        if "header" in page.declared_in:
            self.header_charset_label = label
        parts: list[str] = []
        doctype = rng.choices(["<!DOCTYPE html>", "<!doctype html>",
                               '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN" "http://www.w3.org/TR/html4/loose.dtd">',
                               ""], weights=[0.75, 0.05, 0.08, 0.12])[0]
        if doctype:
            parts.append(doctype)
        else:
            page.quirks.add("missing_doctype")
        parts.append(f'<{t("html")} lang="{lang}">')
        parts.append(f"<{t('head')}>")
        meta_label = label
        if page.charset == "windows-1252" and "header" in page.declared_in and rng.random() < 0.4:
            meta_label = "iso-8859-1"  # header wins, and WHATWG reads this label as windows-1252 anyway
            page.quirks.add("charset_header_meta_differ")
        if "meta" in page.declared_in:
            parts.append(self._tag("meta", [self._attr("charset", meta_label)], void=True))
        if "meta_http_equiv" in page.declared_in:
            parts.append(self._tag("meta", [self._attr("http-equiv", "Content-Type"),
                                            self._attr("content", f"text/html; charset={meta_label}")], void=True))
        parts.append(f"<{t('title')}>{html.escape(title, quote=False)}</{t('title')}>")
        parts.append('<meta name="viewport" content="width=device-width, initial-scale=1">')
        if self.base_href is not None:
            parts.append(self._tag("base", [self._attr("href", self.base_href)], void=True))
        parts.append('<link rel="stylesheet" href="/static/site.css">')
        if rng.random() < 0.08:
            parts.append(self._decoy("script"))
        parts.append(f"</{t('head')}>")
        parts.append(f"<{t('body')}>")
        home, more = T.NAV_LABELS[lang]
        others = rng.sample(self.pages, k=min(3, len(self.pages)))
        nav = " | ".join([f'<a href="/">{home}</a>'] + [f'<a href="{p.path}">{more} {p.index}</a>' for p in others])
        content = [s for s in page.slots if s.asset.kind != "logo"]
        logo = [s for s in page.slots if s.asset.kind == "logo"]
        header = f"<{t('header')}>"
        if logo:
            header += f'<a href="/">{self._img_markup(logo[0])}</a>'
        parts.append(f"{header}<nav>{nav}</nav></{t('header')}>")
        parts.append(f"<{t('main')}>")
        parts.append(f"<{t('h1')}>{html.escape(title.split(' - ')[0], quote=False)}</{t('h1')}>")
        for i, slot in enumerate(content):
            sentence = html.escape(rng.choice(T.SENTENCES[lang]), quote=False)
            close_p = "" if self.broken and rng.random() < 0.5 else f"</{t('p')}>"
            parts.append(f"<{t('p')}>{sentence}{close_p}")
            img = self._img_markup(slot)
            wrapper = rng.choices(["plain", "figure", "link", "div", "table"], weights=[0.3, 0.3, 0.15, 0.15, 0.1])[0]
            if wrapper == "figure":
                caption = html.escape(rng.choice(T.SENTENCES[lang]).split(",")[0].split("、")[0], quote=False)
                parts.append(f"<{t('figure')}>{img}<{t('figcaption')}>{caption}</{t('figcaption')}></{t('figure')}>")
            elif wrapper == "link":
                parts.append(f'<a href="{slot.asset.path or "#"}">{img}</a>')
            elif wrapper == "div":
                unclosed = self.broken and rng.random() < 0.4
                parts.append(f'<{t("div")} class="gallery-item">{img}' + ("" if unclosed else f"</{t('div')}>"))
            else:
                if self.broken and wrapper == "table":
                    parts.append(f"<{t('table')}><{t('tr')}><{t('td')}>{img}</{t('td')}></{t('table')}>")
                else:
                    parts.append(img)
            if self.broken and i == 0:
                parts.append(rng.choice(("</span></div>", "<b><i>Neu!</b></i>", "<br/><br>", "<p><div>note</p></div>")))
        if rng.random() < 0.08:
            parts.append(self._decoy("comment"))
        parts.append(f"</{t('main')}>" if not self.broken else "")
        parts.append(f"<{t('footer')}><{t('p')}>© 2024 {T.SITE_NAME}</{t('p')}></{t('footer')}>")
        if not (self.broken and rng.random() < 0.5):
            parts.append(f"</{t('body')}>\n</{t('html')}>")
        if self.broken:
            page.quirks.add("broken_markup")
        if self.style.upper:
            page.quirks.add("uppercase_tags")
        if self.style.self_close:
            page.quirks.add("self_closing_tags")
        if self.style.raw_ampersand and any("&" in (e["src_attr"] or "") for e in self.images):
            page.quirks.add("raw_ampersand_in_url")
        return "\n".join(parts) + "\n"

    def encode(self, text: str) -> bytes:
        page = self.page
        body = text.encode(page.charset, errors="xmlcharrefreplace")
        if page.charset != "utf-8":
            page.quirks.add("non_utf8")
        if body.count(b"&#") > text.count("&#"):
            page.quirks.add("unencodable_chars_as_char_refs")
        if "bom" in page.declared_in:
            body = b"\xef\xbb\xbf" + body
            page.quirks.add("utf8_bom")
        if not page.declared_in:
            page.quirks.add("no_charset_declared")
        if "header" in page.declared_in:
            page.quirks.add("charset_in_http_header")
        if "meta" in page.declared_in:
            page.quirks.add("charset_in_meta")
        if "meta_http_equiv" in page.declared_in:
            page.quirks.add("charset_in_meta_http_equiv")
        return body

    @property
    def content_type(self) -> str:
        if self.header_charset_label is not None:
            return f"text/html; charset={self.header_charset_label}"
        return "text/html"


# --------------------------------------------------------------------------------------
# WARC


@dataclass
class _Response:
    """One HTTP exchange as the crawler saw it."""

    url: str
    status: str
    headers: list[tuple[str, str]]
    body: bytes
    page_index: int | None = None


def _warc_date(i: int) -> str:
    return (_EPOCH + timedelta(seconds=7 * i)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _http_date(i: int) -> str:
    return (_EPOCH + timedelta(seconds=7 * i)).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _record_id(rng: random.Random) -> str:
    return f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"


def _write_warc(path: Path, responses: list[_Response], seed: int, clock_start: int) -> list[dict[str, Any]]:
    """Write warcinfo, then request + response + metadata per exchange, like Common Crawl's
    WARC files; return the (type, uri) list in file order."""
    rng = random.Random(f"demo-web:{seed}:warc:{path.name}")
    writer_records: list[dict[str, Any]] = []
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        info = (f"software: laion-spark demo web\r\nformat: WARC File Format 1.0\r\nisPartOf: laion-spark-demo-{seed}\r\n"
                "description: generated demo web; see ground_truth.json\r\n").encode()
        warcinfo_id = _record_id(rng)
        writer.write_record(writer.create_warc_record(
            "", "warcinfo", payload=io.BytesIO(info), length=len(info),
            warc_headers_dict={"WARC-Record-ID": warcinfo_id, "WARC-Date": _warc_date(clock_start),
                               "WARC-Filename": path.name, "Content-Type": "application/warc-fields"}))
        writer_records.append({"type": "warcinfo", "uri": None})
        for i, resp in enumerate(responses):
            clock = clock_start + i + 1
            split = urlsplit(resp.url)
            common = {"WARC-Date": _warc_date(clock), "WARC-IP-Address": "127.0.0.1", "WARC-Warcinfo-ID": warcinfo_id}
            request_headers = StatusAndHeaders(f"GET {split.path}{'?' + split.query if split.query else ''} HTTP/1.1", [
                ("Host", split.netloc), ("User-Agent", "CCBot/2.0 (https://commoncrawl.org/faq/)"),
                ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                ("Accept-Language", "en-US,en;q=0.5"), ("Accept-Encoding", "br,gzip"), ("Connection", "Keep-Alive"),
            ], is_http_request=True)
            request_id, response_id = _record_id(rng), _record_id(rng)
            request = writer.create_warc_record(resp.url, "request", http_headers=request_headers,
                                                warc_headers_dict={**common, "WARC-Record-ID": request_id,
                                                                   "WARC-Concurrent-To": response_id})
            response_headers = StatusAndHeaders(resp.status, resp.headers + [("Date", _http_date(clock))], protocol="HTTP/1.1")
            response = writer.create_warc_record(resp.url, "response", payload=io.BytesIO(resp.body), length=len(resp.body),
                                                 http_headers=response_headers,
                                                 warc_headers_dict={**common, "WARC-Record-ID": response_id})
            metadata_body = f"fetchTimeMs: {rng.randint(40, 900)}\r\n".encode()
            metadata = writer.create_warc_record(resp.url, "metadata", payload=io.BytesIO(metadata_body),
                                                 length=len(metadata_body),
                                                 warc_headers_dict={**common, "WARC-Record-ID": _record_id(rng),
                                                                    "WARC-Concurrent-To": response_id,
                                                                    "Content-Type": "application/warc-fields"})
            for record in (request, response, metadata):
                writer.write_record(record)
                writer_records.append({"type": record.rec_type, "uri": resp.url})
    return writer_records


def _page_response_headers(rng: random.Random, content_type: str, body: bytes, clock: int) -> list[tuple[str, str]]:
    headers = [("Server", rng.choice(("Apache/2.4.57 (Debian)", "nginx/1.24.0", "cloudflare"))),
               ("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Last-Modified", _http_date(clock - 86400)), ("Vary", "Accept-Encoding"), ("Connection", "close")]
    if rng.random() < 0.3:
        headers.append(("X-Powered-By", "PHP/8.2.7"))
    if rng.random() < 0.2:  # repeated header: WAT readers must accept lists
        headers += [("Set-Cookie", "session=abc123; Path=/; HttpOnly"), ("Set-Cookie", "consent=0; Path=/")]
    return headers


def _extra_responses(base_url: str, pages: list[_Page], file_index: int, rng: random.Random) -> list[_Response]:
    """Records a crawl also holds that are not pages: a redirect, a 404, robots.txt."""
    target = rng.choice(pages)
    not_found = b"<html><body><h1>Not Found</h1><p>Gone.</p></body></html>\n"
    extra = [
        _Response(f"{base_url}/old/{target.language}/page-{target.index}.html", "301 Moved Permanently",
                  [("Location", base_url + target.path), ("Content-Type", "text/html; charset=iso-8859-1"),
                   ("Content-Length", "0")], b""),
        _Response(f"{base_url}/en/deleted-{file_index}.html", "404 Not Found",
                  [("Content-Type", "text/html"), ("Content-Length", str(len(not_found)))], not_found),
    ]
    if file_index == 0:
        robots = b"User-agent: *\nDisallow: /private/\n"
        extra.append(_Response(f"{base_url}/robots.txt", "200 OK",
                               [("Content-Type", "text/plain"), ("Content-Length", str(len(robots)))], robots))
    for resp in extra:
        resp.headers = [("Server", "nginx/1.24.0")] + resp.headers
    return extra


# --------------------------------------------------------------------------------------
# Entry point


def generate_demo_web(out_dir: Path | str, base_url: str, seed: int = 0, n_pages: int = 240,
                      n_warc_files: int = 4) -> DemoWeb:
    """Write the demo web for `base_url` under out_dir: site/ (as served), warc/ and ground_truth.json.

    Same seed and base_url give the same bytes. Replaces out_dir's site/, warc/ and
    ground_truth.json if they exist (a server already serving out_dir/site keeps working)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    base_url = base_url.rstrip("/")
    if urlsplit(base_url).scheme not in ("http", "https") or not urlsplit(base_url).netloc:
        raise ValueError(f"base_url must look like http://127.0.0.1:PORT, got {base_url!r}")
    if n_pages < 1 or n_warc_files < 1:
        raise ValueError("n_pages and n_warc_files must be at least 1")
    site_dir, warc_dir = out_dir / "site", out_dir / "warc"
    for stale in (warc_dir,):
        shutil.rmtree(stale, ignore_errors=True)
    if site_dir.exists():  # keep the folder itself: a running server may hold its path
        for child in site_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    site_dir.mkdir(parents=True, exist_ok=True)
    warc_dir.mkdir(parents=True, exist_ok=True)

    planner = _Planner(seed, n_pages)
    pages = planner.plan()
    _write_assets(planner.assets, site_dir, seed)
    _write_file(site_dir, "/static/blank.gif", _BLANK_GIF)
    _write_file(site_dir, "/static/site.css", b"body { font-family: sans-serif; }\nimg { max-width: 100%; }\n")
    _write_file(site_dir, "/robots.txt", b"User-agent: *\nDisallow: /private/\n")

    content_types: dict[str, str] = {}
    page_entries: list[dict[str, Any]] = []
    image_entries: list[dict[str, Any]] = []
    responses: list[_Response] = []
    header_rng = random.Random(f"demo-web:{seed}:headers")
    for page in pages:
        writer = _PageWriter(page, pages, base_url, seed)
        body = writer.encode(writer.render())
        _write_file(site_dir, "/" + page.site_path, body)
        content_types[page.path] = writer.content_type
        if page.path.endswith("/"):
            content_types[page.path + "index.html"] = writer.content_type
        headers = _page_response_headers(header_rng, writer.content_type, body, page.index)
        responses.append(_Response(writer.page_url, "200 OK", headers, body, page.index))
        image_entries.extend(writer.images)
        page_entries.append({
            "url": writer.page_url, "language": page.language, "charset": page.charset,
            "charset_declared_in": page.declared_in, "content_type": writer.content_type,
            "site_path": page.site_path, "n_images": len(writer.images), "warc_file": None,
            "quirks": sorted(page.quirks),
        })
    for asset in planner.assets:
        if asset.content_type and asset.path:
            content_types[asset.path] = asset.content_type

    # Spread the pages over the WARC files in a shuffled order, with a few non-page records each.
    order = list(range(len(pages)))
    random.Random(f"demo-web:{seed}:warc-order").shuffle(order)
    chunks = [order[i::n_warc_files] for i in range(n_warc_files)]
    warc_paths: list[Path] = []
    warc_records: dict[str, list[dict[str, Any]]] = {}
    other_records: list[dict[str, Any]] = []
    clock = 0
    for file_index, chunk in enumerate(chunks):
        name = f"demo-{file_index:05d}.warc.gz"
        rng = random.Random(f"demo-web:{seed}:extra:{file_index}")
        file_responses = [responses[i] for i in chunk]
        for extra in _extra_responses(base_url, pages, file_index, rng):
            file_responses.insert(rng.randint(0, len(file_responses)), extra)
            other_records.append({"url": extra.url, "status": int(extra.status.split()[0]), "warc_file": name})
        for resp in file_responses:
            if resp.page_index is not None:
                page_entries[resp.page_index]["warc_file"] = name
        path = warc_dir / name
        warc_records[name] = _write_warc(path, file_responses, seed, clock)
        clock += len(file_responses) + 1
        warc_paths.append(path)

    rules = {"content_types": content_types,
             "redirects": {a.path: a.redirect_target for a in planner.assets if a.redirect_target and a.path},
             "slow_paths": sorted(a.path for a in planner.assets if a.kind == "slow" and a.path)}
    _write_json_atomic(site_dir / RULES_FILE, rules)

    ground_truth = {
        "seed": seed,
        "base_url": base_url,
        "n_pages": n_pages,
        "url_rule": URL_RULE,
        "min_alt_chars": MIN_ALT_CHARS,
        "min_image_bytes": MIN_IMAGE_BYTES,
        "pages": page_entries,
        "images": image_entries,
        "other_records": other_records,
        "failing_urls": _failing_urls(image_entries),
        "warc_records": warc_records,
        "stats": _stats(page_entries, image_entries),
    }
    ground_truth_path = out_dir / "ground_truth.json"
    _write_json_atomic(ground_truth_path, ground_truth)
    log.info("demo web: %d pages, %d images, %d WARC files in %s (%.1f s)", len(page_entries), len(image_entries),
             len(warc_paths), out_dir, time.perf_counter() - started)
    return DemoWeb(out_dir, base_url, warc_paths, ground_truth_path, site_dir, seed)


def _failing_urls(images: list[dict[str, Any]]) -> dict[str, list[str]]:
    failing: dict[str, set[str]] = {}
    for image in images:
        if image["expected_download"] in ("http_404", "timeout", "bad_bytes"):
            failing.setdefault(image["expected_download"], set()).add(image["url"])
    return {reason: sorted(urls) for reason, urls in sorted(failing.items())}


def _stats(pages: list[dict[str, Any]], images: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts a reader wants at a glance (the tests check the shares)."""
    def count(values: list[Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in values:
            out[str(v)] = out.get(str(v), 0) + 1
        return dict(sorted(out.items()))

    extractable = [i for i in images if i["extractable"]]
    scored = [i for i in extractable if i["expected_download"] == "success"]
    return {
        "pages_by_language": count([p["language"] for p in pages]),
        "pages_by_charset": count([p["charset"] for p in pages]),
        "images": len(images),
        "unique_image_urls": len({i["url"] for i in images}),
        "images_by_expected_download": count([i["expected_download"] for i in images]),
        "images_by_drop_reason": count([i["drop_reason"] for i in images]),
        "extractable": len(extractable),
        "extractable_success": len(scored),
        "matches_share_of_extractable_success": round(sum(i["matches"] for i in scored) / max(1, len(scored)), 3),
        "quirks": count([q for p in pages for q in p["quirks"]]),
    }


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
