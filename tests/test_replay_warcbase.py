"""Real pages with their own images, end to end: extract a real 2008 Heritrix crawl of archive.org,
then download its candidates from a replay of the same archive's image responses on 127.0.0.1,
under their original URLs (the downloader's `connect_to` routes every host to the replay; the
URL, Host header and address rules are otherwise the normal ones). No Spark: the plain cores."""
from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download_server import ReplayServer  # noqa: E402

from laion_spark.config import DownloadConfig, ExtractConfig  # noqa: E402
from laion_spark.download.downloader import IMAGES_SCHEMA, download_batches, error_code  # noqa: E402
from laion_spark.extract.extractor import extract_file_batches  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
if not REAL.exists():
    REAL = Path("/work/shared/data/real")
ARCHIVE = REAL / "warcbase-example.warc.gz"

pytestmark = pytest.mark.skipif(not ARCHIVE.exists(), reason="real data (shared/data/real) not present")

# archive: (at least this many candidates, at least this share of them resolvable in the archive).
# warcbase: Heritrix, archive.org 2008 (542 candidates, 23 URLs); the Mona Lisa page: wget,
# en.wikipedia.org 2013 (8 candidates, 4 URLs).
ARCHIVES = {"warcbase-example.warc.gz": (500, 0.9), "wikipedia-mona-lisa-flashfrozen.warc.gz": (8, 0.9)}


@pytest.fixture(scope="module", params=list(ARCHIVES))
def archive(request):
    path = REAL / request.param
    if not path.exists():
        pytest.skip(f"{path} not present")
    srv = ReplayServer(str(path)).start()
    table = pa.Table.from_batches(list(extract_file_batches(str(path), ExtractConfig())))
    yield request.param, srv, table.filter(pc.equal(table.column("kind"), "candidate"))
    srv.stop()


def _download(candidates: pa.Table, cfg: DownloadConfig, extra_urls: list[str] = ()) -> dict[int, dict]:
    cols = {n: candidates.column(n).to_pylist() for n in ("url", "text", "language", "language_group")}
    cols["uid"] = list(range(candidates.num_rows))  # row numbers: a page repeats its (url, alt) pairs
    for i, url in enumerate(extra_urls):
        cols["uid"].append(-1 - i)
        cols["url"].append(url)
        cols["text"].append("guard check")
        cols["language"].append("en")
        cols["language_group"].append("en")
    batch = pa.RecordBatch.from_pydict({**cols, "shard": [0] * len(cols["uid"])})
    out = pa.Table.from_batches(list(download_batches([batch], cfg, batch_rows=128)), schema=IMAGES_SCHEMA)
    assert out.num_rows == batch.num_rows, "one row per candidate"
    return {r["uid"]: r for r in out.to_pylist()}


def test_extract_then_download_the_archive_images(archive):
    name, replay, candidates = archive
    min_rows, min_share = ARCHIVES[name]
    rows_in = [dict(r, uid=i) for i, r in enumerate(candidates.to_pylist())]
    expected = {}
    for r in rows_in:
        end = replay.resolve(r["url"])
        if end is not None and end[0] == 200 and end[2].startswith("image/"):
            expected[r["uid"]] = hashlib.sha256(end[1]).hexdigest()
    # The archive holds most of what its pages show (warcbase: 825 of 861 <img>).
    assert len(rows_in) >= min_rows and len(expected) >= min_share * len(rows_in), (len(rows_in), len(expected))

    cfg = DownloadConfig(
        connect_to={"*": replay.address}, allow_loopback=True, threads_per_task=8, per_host_concurrency=8,
        total_deadline_s=30.0, min_image_bytes=0, allowed_formats=["JPEG", "PNG", "WEBP", "GIF"])
    guard_urls = ["http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/",
                  "http://[2002:a9fe:a9fe::]/x.jpg"]
    rows = _download(candidates, cfg, guard_urls)

    ok = [uid for uid in expected if rows[uid]["status"] == "success"]
    codes = Counter(error_code(rows[uid]["error"]) for uid in expected if uid not in ok)
    assert len(ok) >= 0.95 * len(expected), (len(ok), len(expected), codes)
    for uid in ok:
        assert rows[uid]["image_bytes_sha256"] == expected[uid], rows[uid]["url"]
        assert rows[uid]["image"] and rows[uid]["width"] == 256
    # Candidates the archive does not hold are the replay's 404s, nothing else.
    for r in rows_in:
        if r["uid"] not in expected:
            assert rows[r["uid"]]["status"] == "failed", rows[r["uid"]]
    # connect_to routes names only: addresses written in URLs still meet the address rules.
    for i in range(len(guard_urls)):
        assert (rows[-1 - i]["status"], error_code(rows[-1 - i]["error"])) == ("skipped", "blocked_address")


def test_replay_target_itself_is_checked(archive):
    """Without allow_loopback, routing every host to 127.0.0.1 is refused like any loopback."""
    _, replay, candidates = archive
    hits = replay.hits
    rows = _download(candidates.slice(0, 5), DownloadConfig(connect_to={"*": replay.address}))
    assert {error_code(r["error"]) for r in rows.values()} == {"blocked_address"}
    assert replay.hits == hits
