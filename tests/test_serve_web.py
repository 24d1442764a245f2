"""The web page in a real browser (Playwright driving Debian's chromium, headless, 127.0.0.1):
type a query, images load, safe mode toggles, scrolling pulls more through /metadata, "similar
image" searches again, an export downloads and reads back; and clip-retrieval's own front
(from its wheel) pointed at our back shows results. Screenshots are kept in the test's tmp
folder (paths logged)."""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from laion_spark.serve.app import ServeSpec
from serve_fixtures import clip_front_dir, free_port, truth, url  # noqa: F401

log = logging.getLogger(__name__)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no chromium at {CHROMIUM}: scripts/setup-system.sh installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _loaded_images(page) -> int:
    return page.evaluate("""() => [...document.querySelectorAll('#grid img')]
        .filter(i => i.complete && i.naturalWidth > 0).length""")


def test_page_search_toggle_scroll_similar_export(url, truth, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 800}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#indice option", state="attached")
    # 1. type a query: results load, images decode
    page.fill("#k", "300")
    page.uncheck("#dedup")
    page.fill("#q", "a red circle on a white background")
    with page.expect_response(lambda r: r.url.endswith("/api/search")):
        page.press("#q", "Enter")
    page.wait_for_selector("#grid .card")
    page.wait_for_function("""() => [...document.querySelectorAll('#grid img')].slice(0, 8)
        .every(i => i.complete && i.naturalWidth > 0)""", timeout=30_000)
    first = page.locator("#grid .card").count()
    assert first == 40
    rows = truth["rows"]
    top_ids = [int(x) for x in page.eval_on_selector_all("#grid .card", "els => els.map(e => e.dataset.id)")]
    assert sum(rows[i]["shape"] == "circle" and rows[i]["color"] == "red"
               for i in top_ids[:10]) >= 4
    assert "q=a+red+circle" in page.url and "dedup=0" in page.url  # state in the URL
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=False)
    log.info("serve page screenshot: %s", shot)
    print("screenshot", shot)
    # 2. safe mode: the planted unsafe row appears only with safe mode off
    page.fill("#q", "a blue square on a white background")
    with page.expect_response(lambda r: r.url.endswith("/api/search")):
        page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('removed')")
    assert "unsafe 1" in page.inner_text("#status")
    ids_safe = page.eval_on_selector_all("#grid .card", "els => els.map(e => +e.dataset.id)")
    assert truth["planted"]["unsafe"] not in ids_safe
    with page.expect_response(lambda r: r.url.endswith("/api/search")):
        page.uncheck("#safe")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('results')")
    assert "unsafe" not in page.inner_text("#status")
    ids_all = page.eval_on_selector_all("#grid .card", "els => els.map(e => +e.dataset.id)")
    assert truth["planted"]["unsafe"] in ids_all
    assert "safe=0" in page.url
    # 3. scroll: another page of results through /metadata
    with page.expect_response(lambda r: r.url.endswith("/metadata")):
        page.mouse.wheel(0, 20_000)
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length >= 80")
    # 4. search similar (image of the first result)
    first_id = int(page.locator("#grid .card").first.get_attribute("data-id"))
    with page.expect_response(lambda r: r.url.endswith("/api/search")):
        page.locator("#grid .card .similar-image").first.click()
    page.wait_for_function(f"() => document.querySelector('#grid .card') && "
                           f"+document.querySelector('#grid .card').dataset.id === {first_id}")
    assert f"similar={first_id}" in page.url
    # 5. export: a Parquet file of the current results, read back
    with page.expect_download() as dl:
        page.click("#export-parquet")
    path = tmp_path / "subset.parquet"
    dl.value.save_as(str(path))
    table = pq.read_table(path)
    assert table.num_rows >= 40 and table.column("id")[0].as_py() == first_id
    with page.expect_download() as dl:
        page.click("#export-img2dataset")
    csv = tmp_path / "subset.csv"
    dl.value.save_as(str(csv))
    assert csv.read_text().splitlines()[0].replace('"', "") == "url,caption"
    # stats panel
    page.click("#stats-panel summary")
    assert page.locator("#stats svg rect").count() == 24
    # shareable: the URL alone reproduces the search
    page2 = browser.new_page()
    page2.goto(page.url)
    page2.wait_for_function(f"() => document.querySelector('#grid .card') && "
                            f"+document.querySelector('#grid .card').dataset.id === {first_id}")
    assert not page2.is_checked("#safe")
    page2.close()
    assert not errors, errors
    page.close()


def test_clip_retrieval_front_shows_our_results(url, browser, tmp_path):
    """clip-retrieval's own built front (front/build in its wheel) on another 127.0.0.1 port,
    its config pointing at our back: a text query shows result images."""
    front = clip_front_dir()
    assert (front / "index.html").exists(), f"clip-retrieval front not found at {front}"
    site = tmp_path / "front"
    shutil.copytree(front, site)
    (site / "config.json").write_text(json.dumps({"defaultBackend": url, "defaultIndex": "demo",
                                                   "urlColumn": "thumbnail"}))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        front_url = f"http://127.0.0.1:{httpd.server_address[1]}/?query=a%20red%20circle"
        with page.expect_response(lambda r: r.url.endswith("/knn-service")) as resp:
            page.goto(front_url)
        assert resp.value.status == 200 and len(resp.value.json()) > 0
        # the front renders results inside its shadow DOM; Playwright's CSS pierces it
        page.wait_for_function("""() => {
            const f = document.querySelector('clip-front');
            const imgs = f && f.shadowRoot ? f.shadowRoot.querySelectorAll('img') : [];
            return [...imgs].filter(i => i.src.includes('/api/image/') && i.complete &&
                i.naturalWidth > 0).length >= 3; }""", timeout=30_000)
        shot = tmp_path / "clip-front.png"
        page.screenshot(path=str(shot))
        log.info("clip-retrieval front screenshot: %s", shot)
        print("screenshot", shot)
        page.close()
    finally:
        httpd.shutdown()
