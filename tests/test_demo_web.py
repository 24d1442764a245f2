"""The demo web: its WARC files read back record for record, its pages parse to the images the
ground truth lists, and its server answers every URL the pages reference as the ground truth says."""

from __future__ import annotations

import codecs
import hashlib
import http.client
import io
import json
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from PIL import Image
from warcio.archiveiterator import ArchiveIterator

from laion_spark.demo import text as demo_text
from laion_spark.demo.scenes import (BACKGROUNDS, COLORS, LANGUAGES, N_TEMPLATES, SHAPES, Scene, describe_scene,
                                     random_scene, render_scene)
from laion_spark.demo.server import DemoWebServer, serve_demo_web
from laion_spark.demo.web import generate_demo_web, load_ground_truth


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The full-size demo web (240 pages), served for the whole module."""
    out_dir = tmp_path_factory.mktemp("demo-web")
    with serve_demo_web(out_dir, seed=0) as (server, web):
        yield server, web, load_ground_truth(web.ground_truth_path)


# ---------------------------------------------------------------------------------------
# Scenes and captions


def _all_scenes() -> list[Scene]:
    return [Scene(s, c, b, n) for s in SHAPES for c in COLORS for b in BACKGROUNDS if b != c for n in range(1, 5)]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_captions_tell_every_scene_apart(lang):
    scenes = _all_scenes()
    for template in range(N_TEMPLATES):
        rng = _TemplateRng(template)
        captions = {describe_scene(scene, lang, rng) for scene in scenes}
        assert len(captions) == len(scenes), f"{lang} template {template} gives two scenes the same caption"


def test_caption_examples():
    scene = Scene("circle", "red", "white", 2)
    assert describe_scene(scene, "en") == "two red circles on a white background"
    assert describe_scene(scene, "de") == "zwei rote Kreise auf weißem Hintergrund"
    assert describe_scene(scene, "fr") == "deux cercles rouges sur fond blanc"
    assert describe_scene(scene, "es") == "dos círculos rojos sobre fondo blanco"
    assert describe_scene(scene, "ja") == "白い背景に赤い円が二つ"
    assert describe_scene(Scene("star", "orange", "grey", 1), "en") == "an orange star on a grey background"
    assert describe_scene(Scene("diamond", "green", "black", 1), "de") == "eine grüne Raute auf schwarzem Hintergrund"
    assert describe_scene(Scene("star", "purple", "beige", 3), "fr") == "trois étoiles violettes sur fond beige"
    with pytest.raises(ValueError):
        describe_scene(scene, "xx")


def test_scene_validation():
    with pytest.raises(ValueError):
        Scene("blob", "red", "white", 1)
    with pytest.raises(ValueError):
        Scene("circle", "black", "black", 1)
    with pytest.raises(ValueError):
        Scene("circle", "red", "white", 0)
    assert Scene.from_dict(Scene("ring", "pink", "grey", 3).to_dict()) == Scene("ring", "pink", "grey", 3)


def test_render_scene_is_deterministic_large_enough_and_shows_its_colour():
    rng = random.Random(7)
    for _ in range(25):
        scene = random_scene(rng)
        image = render_scene(scene)
        assert image.mode == "RGB" and image.size == (320, 240)
        assert render_scene(scene).tobytes() == image.tobytes()
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=90)
        assert len(jpeg.getvalue()) > 5000
        target = COLORS[scene.color]
        distance = np.abs(np.asarray(image, dtype=np.int16) - np.array(target, dtype=np.int16)).sum(axis=2)
        assert (distance < 90).mean() > 0.02, f"{scene} shows too little {scene.color}"


class _TemplateRng(random.Random):
    """An RNG whose randrange picks a fixed template (to enumerate captions)."""

    def __init__(self, template: int) -> None:
        super().__init__(0)
        self.template = template

    def randrange(self, *args, **kwargs) -> int:  # type: ignore[override]
        return self.template


# ---------------------------------------------------------------------------------------
# WARC files


def test_warc_files_read_back_record_for_record(demo):
    _, web, gt = demo
    assert [p.name for p in web.warc_paths] == sorted(gt["warc_records"])
    pages_by_url = {p["url"]: p for p in gt["pages"]}
    seen_pages = set()
    for warc_path in web.warc_paths:
        records = []
        with warc_path.open("rb") as fh:
            for record in ArchiveIterator(fh):
                uri = record.rec_headers.get_header("WARC-Target-URI")
                records.append({"type": record.rec_type, "uri": uri})
                if record.rec_type == "response" and uri in pages_by_url:
                    page = pages_by_url[uri]
                    assert page["warc_file"] == warc_path.name
                    assert record.http_headers.get_statuscode() == "200"
                    assert record.http_headers.get_header("Content-Type") == page["content_type"]
                    body = record.content_stream().read()
                    assert body == (web.site_dir / page["site_path"]).read_bytes()
                    seen_pages.add(uri)
        assert records == gt["warc_records"][warc_path.name]
        assert records[0]["type"] == "warcinfo"
    assert seen_pages == set(pages_by_url)
    assert len(gt["pages"]) == 240


# ---------------------------------------------------------------------------------------
# Pages: an independent parse (stdlib html.parser) finds exactly the ground truth's images


class _ImgCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.imgs: list[dict[str, str | None]] = []
        self.sources: list[dict[str, str | None]] = []
        self.base_href: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = {}
        for name, value in attrs:
            attributes.setdefault(name, value)  # the first of repeated attributes wins, as in browsers
        if tag == "img":
            self.imgs.append(attributes)
        elif tag == "source":
            self.sources.append(attributes)
        elif tag == "base" and self.base_href is None and attributes.get("href"):
            self.base_href = attributes["href"]


def _srcset_candidates(srcset: str) -> list[tuple[str, float]]:
    candidates = []
    for item in srcset.split(","):
        parts = item.split()
        if parts:
            descriptor = parts[1] if len(parts) > 1 else "1x"
            candidates.append((parts[0], float(descriptor[:-1])))
    return candidates


def _sniff_charset(body: bytes, content_type: str) -> str:
    """BOM, then the HTTP header, then a <meta> in the first 1024 bytes, then UTF-8."""
    if body.startswith(codecs.BOM_UTF8):
        return "utf-8"
    match = re.search(r"charset=([\w-]+)", content_type, re.I)
    if match is None:
        match = re.search(rb"<meta[^>]+charset=[\"']?([\w-]+)", body[:1024], re.I)
    if match is None:
        return "utf-8"
    label = match.group(1)
    return label.decode("ascii") if isinstance(label, bytes) else label


def _parse_pages(web, gt):
    """{page_url: (images as (url, alt) in order, every image-ish URL referenced)}"""
    parsed = {}
    for page in gt["pages"]:
        body = (web.site_dir / page["site_path"]).read_bytes()
        label = _sniff_charset(body, page["content_type"])
        assert codecs.lookup(label).name == codecs.lookup(page["charset"]).name, page["url"]
        collector = _ImgCollector()
        collector.feed(body.decode(page["charset"].replace("utf-8", "utf-8-sig")))
        collector.close()
        base = urljoin(page["url"], collector.base_href.strip()) if collector.base_href else page["url"]
        images, referenced = [], set()
        for attrs in collector.imgs:
            images.append((_url_by_rule(attrs, base), _alt(attrs)))
            for name in ("src", "data-src"):
                if attrs.get(name):
                    referenced.add(urljoin(base, attrs[name].strip()))
            for candidate, _ in _srcset_candidates(attrs.get("srcset") or ""):
                referenced.add(urljoin(base, candidate))
        for attrs in collector.sources:
            for candidate, _ in _srcset_candidates(attrs.get("srcset") or ""):
                referenced.add(urljoin(base, candidate))
        parsed[page["url"]] = (images, {u for u in referenced if urlsplit(u).scheme in ("http", "https")})
    return parsed


def test_pages_parse_to_the_ground_truth_images(demo):
    _, web, gt = demo
    parsed = _parse_pages(web, gt)
    by_page: dict[str, list[tuple[str, str | None]]] = {}
    for image in gt["images"]:
        by_page.setdefault(image["page_url"], []).append((image["url"], image["alt"]))
    for page in gt["pages"]:
        assert parsed[page["url"]][0] == by_page.get(page["url"], []), page["url"]
        assert page["n_images"] == len(by_page.get(page["url"], []))


def _url_by_rule(attrs, base: str) -> str:
    if attrs.get("data-src"):
        return urljoin(base, attrs["data-src"].strip())
    if attrs.get("src"):
        return urljoin(base, attrs["src"].strip())
    return urljoin(base, max(_srcset_candidates(attrs["srcset"]), key=lambda c: c[1])[0])


def _alt(attrs) -> str | None:
    return " ".join(attrs["alt"].split()) if attrs.get("alt") is not None else None


def test_extractor_parsers_agree_with_the_ground_truth(demo):
    """The parsers the extract stage uses (selectolax/lexbor; BeautifulSoup+lxml as reference,
    fed raw bytes so it sniffs the charset itself) see the same images as the ground truth."""
    lexbor = pytest.importorskip("selectolax.lexbor")
    bs4 = pytest.importorskip("bs4")
    pytest.importorskip("lxml")
    _, web, gt = demo
    by_page: dict[str, list] = {}
    for image in gt["images"]:
        by_page.setdefault(image["page_url"], []).append((image["url"], image["alt"]))
    for page in gt["pages"]:
        body = (web.site_dir / page["site_path"]).read_bytes()
        expected = by_page.get(page["url"], [])
        tree = lexbor.LexborHTMLParser(body.decode(page["charset"].replace("utf-8", "utf-8-sig")))
        base_node = tree.css_first("base[href]")
        base = urljoin(page["url"], base_node.attributes["href"].strip()) if base_node else page["url"]
        assert [(_url_by_rule(n.attributes, base), _alt(n.attributes)) for n in tree.css("img")] == expected, page["url"]
        # The HTTP header's charset wins over <meta> (and is the only declaration on some pages).
        header_charset = re.search(r"charset=([\w-]+)", page["content_type"])
        soup = bs4.BeautifulSoup(body, "lxml", from_encoding=header_charset.group(1) if header_charset else None)
        base_tag = soup.find("base", href=True)
        base = urljoin(page["url"], base_tag["href"].strip()) if base_tag else page["url"]
        assert [(_url_by_rule(n.attrs, base), _alt(n.attrs)) for n in soup.find_all("img")] == expected, page["url"]


def test_ground_truth_flags_follow_the_laion_rules(demo):
    _, _, gt = demo
    for image in gt["images"]:
        url, alt = image["url"], image["alt"]
        keep = (urlsplit(url).scheme in ("http", "https") and ".svg" not in url.lower() and ".gif" not in url.lower()
                and alt is not None and len(alt) >= 5)
        assert image["extractable"] == keep, image
        assert (image["drop_reason"] is None) == keep
        if image["matches"]:
            scene = Scene.from_dict(image["scene"])
            prefixes = [""] + demo_text.CAPTION_PREFIXES[image["language"]]
            captions = {p + describe_scene(scene, image["language"], _TemplateRng(t))
                        for p in prefixes for t in range(N_TEMPLATES)}
            assert alt in {" ".join(c.split()) for c in captions}, image
        if image["alt_kind"] == "other_scene_caption" and image["scene"]:
            scene = Scene.from_dict(image["scene"])
            own = {describe_scene(scene, image["language"], _TemplateRng(t)) for t in range(N_TEMPLATES)}
            assert alt not in own


def test_ground_truth_covers_the_cases_the_stages_need(demo):
    _, _, gt = demo
    pages, images = gt["pages"], gt["images"]
    languages = [p["language"] for p in pages]
    assert set(languages) == {"en", "de", "fr", "ja", "es"}
    assert 0.45 <= languages.count("en") / len(languages) <= 0.55
    assert {"utf-8", "iso-8859-1", "windows-1252", "shift_jis"} <= {p["charset"] for p in pages}
    outcomes = {i["expected_download"] for i in images}
    assert {"success", "too_small", "http_404", "timeout", "bad_bytes"} <= outcomes
    reasons = {i["drop_reason"] for i in images}
    assert {"data_uri", "javascript_url", "svg", "gif", "missing_alt", "empty_alt", "short_alt"} <= reasons
    scored = [i for i in images if i["extractable"] and i["expected_download"] == "success"]
    share = sum(i["matches"] for i in scored) / len(scored)
    assert 0.55 <= share <= 0.65, share
    pages_per_url: dict[str, set[str]] = {}
    for image in images:
        pages_per_url.setdefault(image["url"], set()).add(image["page_url"])
    assert sum(len(p) > 1 for p in pages_per_url.values()) >= 20  # duplicates across pages
    quirks = {q for p in pages for q in p["quirks"]}
    assert {"relative_url", "base_href", "srcset", "srcset_only", "data_src_lazy", "uppercase_tags", "broken_markup",
            "non_utf8", "charset_in_http_header", "charset_in_meta", "data_uri", "duplicate_image",
            "img_in_comment", "img_in_script", "entities_in_alt", "whitespace_in_alt", "utf8_bom",
            "protocol_relative_url", "unquoted_attributes", "picture_source"} <= quirks
    non_utf8 = [p for p in pages if p["charset"] != "utf-8"]
    assert any(p["charset_declared_in"] == ["header"] for p in non_utf8)
    assert any("header" not in p["charset_declared_in"] for p in non_utf8)
    assert all(i["n_bytes"] < 5000 for i in images if i["expected_download"] == "too_small")
    assert all(i["n_bytes"] >= 5000 for i in images if i["expected_download"] == "success"
               and i["image_format"] in ("JPEG", "PNG", "WEBP"))


# ---------------------------------------------------------------------------------------
# Server


def _fetch(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def test_server_serves_every_referenced_url_except_the_failing_ones(demo):
    server, web, gt = demo
    assert server.base_url == gt["base_url"]
    expected = {}
    for image in gt["images"]:
        if urlsplit(image["url"]).scheme == "http":
            expected[image["url"]] = image
    referenced = set(expected)
    for _, urls in _parse_pages(web, gt).values():
        referenced |= urls
    referenced |= {p["url"] for p in gt["pages"]}
    slow = set(gt["failing_urls"]["timeout"])
    targets = sorted(referenced - slow)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(targets, pool.map(_fetch, targets)))
    pages = {p["url"]: p for p in gt["pages"]}
    for url, (status, body, content_type) in results.items():
        image = expected.get(url)
        outcome = image["expected_download"] if image else "success"
        if outcome == "http_404":
            assert status == 404, url
            continue
        assert status == 200, (url, status)
        if url in pages:
            assert content_type == pages[url]["content_type"]
            assert body == (web.site_dir / pages[url]["site_path"]).read_bytes()
        elif outcome == "bad_bytes":
            assert content_type == "image/jpeg"
            with pytest.raises(Exception):
                Image.open(io.BytesIO(body)).load()
        elif image is not None:
            assert hashlib.sha256(body).hexdigest() == image["sha256"], url
            if outcome == "too_small":
                assert len(body) < 5000
            if outcome == "success":
                decoded = Image.open(io.BytesIO(body))
                assert decoded.size == (image["width"], image["height"])
    failing = {u for urls in gt["failing_urls"].values() for u in urls}
    assert failing - slow <= set(results)


def test_slow_url_never_finishes_in_time(demo):
    server, _, gt = demo
    url = gt["failing_urls"]["timeout"][0]
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=5)
    started = time.monotonic()
    conn.request("GET", split.path)
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) > 5000
    assert len(resp.read(2)) == 2
    assert time.monotonic() - started >= 0.9  # one byte a second: the second one comes after a second
    conn.close()


def test_server_stops_promptly_while_dripping(tmp_path):
    site = tmp_path / "site"
    server = DemoWebServer(site, drip_interval_s=0.05).start()  # starts before the site exists
    (site / "img").mkdir(parents=True)
    (site / "img" / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 10000)
    (site / ".demo-server.json").write_text(json.dumps({"slow_paths": ["/img/a.jpg"],
                                                        "redirects": {"/go/a.jpg": "/img/a.jpg"}}))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/img/a.jpg")
    resp = conn.getresponse()
    assert resp.read(3) == b"\xff\xd8x"
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    conn.close()


def test_server_details(tmp_path):
    site = tmp_path / "site"
    with DemoWebServer(site) as server:
        (site / "dir").mkdir(parents=True)
        (site / "dir" / "index.html").write_bytes(b"<html></html>")
        (site / ".demo-server.json").write_text(json.dumps({"redirects": {"/go/x.jpg": "/dir/"},
                                                            "content_types": {"/dir/": "text/html; charset=EUC-JP"}}))
        assert _fetch(server.base_url + "/dir/") == (200, b"<html></html>", "text/html; charset=EUC-JP")
        assert _fetch(server.base_url + "/.demo-server.json")[0] == 404
        assert _fetch(server.base_url + "/../etc/passwd")[0] == 404
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/go/x.jpg")
        resp = conn.getresponse()
        assert resp.status == 302 and resp.getheader("Location") == "/dir/"
        resp.read()
        conn.request("HEAD", "/dir/index.html")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == "13" and resp.read() == b""
        conn.close()


# ---------------------------------------------------------------------------------------
# Determinism


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_and_base_url_give_the_same_bytes(tmp_path):
    base_url = "http://127.0.0.1:8765"
    first = generate_demo_web(tmp_path / "a", base_url, seed=3, n_pages=30, n_warc_files=2)
    second = generate_demo_web(tmp_path / "b", base_url, seed=3, n_pages=30, n_warc_files=2)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert first.ground_truth() == second.ground_truth()
    other = generate_demo_web(tmp_path / "c", base_url, seed=4, n_pages=30, n_warc_files=2)
    assert other.ground_truth()["images"] != first.ground_truth()["images"]
    assert len(first.warc_paths) == 2 and all(p.exists() for p in first.warc_paths)
