"""The wave runner, counted (not timed) through Spark's REST status API on 127.0.0.1:

* download of 200 one-row shards runs ⌈200/wave⌉ waves, one task per shard, one `images` file per
  shard; scoring a wave reads exactly its shards' `images` files (SQL scan metric);
* extract of N files commits ⌈N/k⌉ waves; a stop between waves loses no committed wave; a crash
  between a wave's data commit and its units commit, followed by log cleanup (checkpoint, old
  commit files deleted), is replayed without a duplicate row;
* every stage re-run after log cleanup redoes nothing;
* a WARC served over HTTP whose first read answers 503 is extracted fully, with no failure row.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download_server import MisbehavingServer  # noqa: E402
from test_download_job import _candidates_df, _test_uid  # noqa: E402

from laion_spark.config import Config, DownloadConfig  # noqa: E402
from laion_spark.lake import wave_app_id  # noqa: E402
from laion_spark.waves import task_slots, wave_size  # noqa: E402

N_SHARDS = 200
SHARDS_PER_SLOT = 50  # local[2]: waves of 100 shards, 2 waves


# ----------------------------------------------------------------------------- REST helpers
def _rest(spark, path: str):
    sc = spark.sparkContext
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/{path}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def _settled(spark, fetch, last_id_key, since: int, want_done=lambda x: True):
    """The UI listener is asynchronous: poll until the newest entries are complete."""
    deadline = time.time() + 30
    while True:
        items = [x for x in fetch() if x[last_id_key] > since]
        if all(want_done(x) for x in items) or time.time() > deadline:
            return items
        time.sleep(0.5)


def _max_job_id(spark) -> int:
    return max([j["jobId"] for j in _rest(spark, "jobs")] or [-1])


def _max_sql_id(spark) -> int:
    return max([e["id"] for e in _rest(spark, "sql?offset=0&length=100000")] or [-1])


def _jobs_since(spark, since: int) -> list[dict]:
    return _settled(spark, lambda: _rest(spark, "jobs"), "jobId", since,
                    lambda j: j["status"] in ("SUCCEEDED", "FAILED"))


def _sql_since(spark, since: int) -> list[dict]:
    return _settled(spark, lambda: _rest(spark, "sql?offset=0&length=100000&details=true"), "id", since,
                    lambda e: e["status"] in ("COMPLETED", "FAILED"))


def _files_read(execution: dict) -> list[int]:
    out = []
    for node in execution.get("nodes", []):
        if node["nodeName"].startswith("Scan"):
            for m in node.get("metrics", []):
                if m["name"] == "number of files read":
                    out.append(int(str(m["value"]).replace(",", "")))
    return out


def _cleanup_log(lake, table: str) -> int:
    """What Delta's log cleanup does after a checkpoint: delete the commit files before it."""
    from deltalake import DeltaTable

    path = lake.table_path(table)
    t = DeltaTable(path)
    t.create_checkpoint()
    version = t.version()
    log_dir = Path(path) / "_delta_log"
    removed = 0
    for f in log_dir.glob("*.json"):
        if int(f.stem) < version:
            f.unlink()
            removed += 1
    return removed


def _versions(lake) -> dict:
    return {t: lake.version(t) for t in lake.tables()}


# ----------------------------------------------------------------------------- download + score
@pytest.fixture(scope="module")
def image_server():
    srv = MisbehavingServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def waves_lake(spark, tmp_path_factory):
    from laion_spark.config import LakeConfig
    from laion_spark.lake import Lake

    return Lake(spark, LakeConfig(root=str(tmp_path_factory.mktemp("waves") / "lake")))


def _one_row_per_shard(base: str, n: int) -> list[tuple[str, str]]:
    """n candidates whose uids fall in n different shards (shard = pmod(uid, n) on a first run)."""
    rows, taken, i = [], set(), 0
    while len(rows) < n:
        url, text = base + f"/ok-{i}", f"caption {i}"
        shard = _test_uid(url, text) % n
        if shard not in taken:
            taken.add(shard)
            rows.append((url, text))
        i += 1
    return rows


def _download_cfg() -> Config:
    cfg = Config()
    cfg.download = DownloadConfig(allow_loopback=True, total_deadline_s=5.0, read_timeout_s=3.0,
                                  connect_timeout_s=3.0, threads_per_task=2, shard_size=1,
                                  per_host_concurrency=8, image_size=32, shards_per_slot=SHARDS_PER_SLOT)
    return cfg


@pytest.fixture(scope="module")
def downloaded(spark, waves_lake, image_server):
    lake = waves_lake
    rows = _one_row_per_shard(image_server.base, N_SHARDS)
    lake.append("candidates", _candidates_df(spark, rows), stage="test")
    from laion_spark.download.job import run_download

    job0, sql0 = _max_job_id(spark), _max_sql_id(spark)
    summary = run_download(spark, _download_cfg(), lake)
    return {"summary": summary, "jobs": _jobs_since(spark, job0), "sql": _sql_since(spark, sql0)}


def test_download_runs_one_wave_per_slots_times_k_and_one_task_per_shard(spark, waves_lake, downloaded):
    lake, summary = waves_lake, downloaded["summary"]
    size = wave_size(task_slots(spark), SHARDS_PER_SLOT, 4096)
    n_waves = math.ceil(N_SHARDS / size)
    assert summary["shards"] == N_SHARDS and summary["waves"] == n_waves
    assert summary["success"] == N_SHARDS and summary["committed_shards"] == N_SHARDS
    groups: dict = {}
    for j in downloaded["jobs"]:
        if (j.get("jobGroup") or "").startswith("download-wave-"):
            groups.setdefault(j["jobGroup"], []).append(j)
    assert len(groups) == n_waves
    stage_tasks = {s["stageId"]: s["numTasks"] for s in _rest(spark, "stages")}
    for jobs in groups.values():
        # the download stage of the wave: one task per shard of the wave
        assert max(stage_tasks[s] for j in jobs for s in j["stageIds"]) == size
    # one images file per shard: min == max shard in every file's stats, 200 files
    stats = lake.file_stats("images")
    assert len(stats) == N_SHARDS
    assert all(f["min"]["shard"] == f["max"]["shard"] for f in stats)
    # one commit per wave on images, download_units and nothing else grows per shard
    assert lake.version("images") == n_waves - 1 and lake.version("download_units") == n_waves - 1
    # the plan was written once, one file per wave; each wave's scans read its one plan file and
    # (for the per-shard counts) its own images files, never the whole plan or table
    assert len(lake.file_stats("download_plan")) == n_waves
    reads: dict = {}
    for e in downloaded["sql"]:
        if e["description"].startswith("download wave"):
            reads.setdefault(e["description"], []).extend(_files_read(e))
    assert len(reads) == n_waves
    for files in reads.values():
        assert sorted(set(files)) == [1, size], files


def test_scoring_a_wave_reads_exactly_its_shards_images_files(spark, waves_lake, downloaded, demo_clip_dir):
    from laion_spark.score.demo_model import train_demo_clip
    from laion_spark.score.job import run_score

    clip = train_demo_clip(str(demo_clip_dir), seed=0)
    cfg = Config()
    cfg.score.clip_model = clip.clip_path
    cfg.score.multilingual_text_model = clip.multilingual_path
    cfg.score.device = "cpu"
    cfg.score.batch_size = 64
    cfg.score.shards_per_slot = SHARDS_PER_SLOT
    sql0 = _max_sql_id(spark)
    summary = run_score(spark, cfg, waves_lake)
    size = wave_size(task_slots(spark), SHARDS_PER_SLOT, cfg.score.max_shards_per_wave)
    assert summary["rows"] == N_SHARDS and summary["waves"] == math.ceil(N_SHARDS / size)
    reads = {}
    for e in _sql_since(spark, sql0):
        if e["description"].startswith("score wave"):
            reads.setdefault(e["description"], []).extend(_files_read(e))
    assert len(reads) == summary["waves"]
    for desc, files in reads.items():
        n_units = int(desc.split(": ")[1].split()[0])
        # the images scan reads exactly the wave's shard files (the other scan: the wave's pairs)
        assert n_units in files and max(files) == n_units, (desc, files)
    pairs = waves_lake.read("pairs")
    assert pairs.count() == N_SHARDS == pairs.select("uid").distinct().count()


def test_every_stage_rerun_after_log_cleanup_redoes_nothing(spark, waves_lake, downloaded,
                                                            demo_clip_dir, image_server):
    from laion_spark.download.job import run_download
    from laion_spark.score.demo_model import train_demo_clip
    from laion_spark.score.job import run_score

    lake = waves_lake
    if not lake.exists("pairs"):
        pytest.skip("needs the scoring test's pairs")
    for t in lake.tables():
        _cleanup_log(lake, t)
    before = _versions(lake)
    hits = dict(image_server.hits)
    d = run_download(spark, _download_cfg(), lake)
    clip = train_demo_clip(str(demo_clip_dir), seed=0)
    cfg = Config()
    cfg.score.clip_model, cfg.score.multilingual_text_model = clip.clip_path, clip.multilingual_path
    cfg.score.device = "cpu"
    s = run_score(spark, cfg, lake)
    assert d["pending_rows"] == 0 and s["shards_scored"] == 0
    assert _versions(lake) == before and image_server.hits == hits
    assert lake.read("pairs").count() == N_SHARDS == lake.read("images").count()


# ----------------------------------------------------------------------------- extract
def _extract_cfg(lake, inputs, k: int) -> Config:
    cfg = Config()
    cfg.lake = lake.cfg
    cfg.extract.inputs = [str(p) for p in inputs]
    cfg.extract.max_files_per_wave = k
    return cfg


def test_extract_waves_stop_crash_and_log_cleanup(spark, lake, real_data, tmp_path, monkeypatch):
    from laion_spark.extract import job as extract_job

    src = real_data / "IAH-urls-wget.warc.gz"
    other = real_data / "CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc"
    files = [tmp_path / f"f{i}.warc.gz" for i in range(4)] + [tmp_path / "g.warc"]
    for f in files[:4]:
        shutil.copy(src, f)
    shutil.copy(other, files[4])
    k = 2
    cfg = _extract_cfg(lake, files, k)

    # A bounded run (a kill between waves): 1 wave committed, the rest pending.
    s1 = extract_job.run_extract(spark, cfg, lake, max_waves=1)
    assert s1["waves"] == 1 and s1["files_extracted"] == k and s1["files_pending"] == len(files) - k
    assert lake.version("extract_files") == 0
    n1 = lake.read("candidates").count()
    assert n1 > 0

    # A crash between the second wave's data commits and its units commit, then log cleanup.
    real_append = lake.append

    def crash(name, df, **kw):
        if name == extract_job.FILES_TABLE:
            raise RuntimeError("simulated crash before the units commit")
        return real_append(name, df, **kw)

    monkeypatch.setattr(lake, "append", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_job.run_extract(spark, cfg, lake)
    monkeypatch.setattr(lake, "append", real_append)
    (open_wave,) = lake.open_waves("extract")
    assert (lake.transaction_version("candidates", wave_app_id("extract", open_wave[0])) or 0) == 1
    candidates_version = lake.version("candidates")
    for t in ("candidates", "failures", "extract_files"):
        _cleanup_log(lake, t)

    # The re-run replays that wave first (data commits skipped: the txn survived the cleanup),
    # then the last wave: ⌈N/k⌉ waves in all, every file once, every uid once.
    s2 = extract_job.run_extract(spark, cfg, lake)
    assert s2["waves"] == math.ceil(len(files) / k) - 1 and s2["files_pending"] == 0
    assert s2["files_skipped"] == k and s2["files_extracted"] == len(files) - k
    assert lake.open_waves("extract") == []
    assert lake.version("extract_files") == math.ceil(len(files) / k) - 1
    assert lake.version("candidates") == candidates_version + 1  # only the last wave added rows
    got = {r["source_file"] for r in lake.read("extract_files").select("source_file").collect()}
    assert got == {str(f) for f in files} and lake.read("extract_files").count() == len(files)
    # Waves 1 and 2 hold the same file's uids (copies; no per-wave anti-join against the table):
    # the table holds them twice, the readers' view once.
    uids = [r[0] for r in lake.read_current("candidates", ["uid"]).collect()]
    assert len(uids) == len(set(uids))
    from laion_spark.extract.extractor import extract_file_table

    per_file = [{r["uid"] for r in extract_file_table(str(f), cfg.extract).to_pylist()
                 if r["kind"] == "candidate"} for f in (files[0], files[4])]
    want = per_file[0] | per_file[1]
    assert set(uids) == want
    assert lake.read("candidates").count() == len(want) + len(per_file[0])

    # After log cleanup of every table, a re-run does nothing.
    for t in lake.tables():
        _cleanup_log(lake, t)
    before = _versions(lake)
    s3 = extract_job.run_extract(spark, cfg, lake)
    assert s3["files_extracted"] == 0 and s3["waves"] == 0 and _versions(lake) == before


# ----------------------------------------------------------------------------- transient errors
class _FlakyWarcServer:
    """Serves files with HEAD and Range GET; the first GET of each path answers 503 (or, with
    mode='reset', closes the connection without answering)."""

    def __init__(self, root: Path, mode: str = "503"):
        self.root, self.mode = root, mode
        self.gets: dict[str, int] = {}
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _body(self):
                p = outer.root / self.path.lstrip("/")
                return p.read_bytes() if p.is_file() else None

            def do_HEAD(self):
                body = self._body()
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                n = outer.gets[self.path] = outer.gets.get(self.path, 0) + 1
                body = self._body()
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if n == 1:
                    if outer.mode == "reset":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rng = self.headers.get("Range")
                start, end = 0, len(body) - 1
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a or 0)
                    end = min(int(b) if b else len(body) - 1, len(body) - 1)
                chunk = body[start:end + 1]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Accept-Ranges", "bytes")
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_transient_read_error_is_retried_not_a_failure_row(spark, lake, real_data, tmp_path, mode):
    from laion_spark.extract import job as extract_job
    from laion_spark.extract.extractor import extract_file_table

    src = real_data / "IAH-urls-wget.warc.gz"
    shutil.copy(src, tmp_path / "a.warc.gz")
    srv = _FlakyWarcServer(tmp_path, mode)
    try:
        url = f"{srv.base}/a.warc.gz"
        cfg = _extract_cfg(lake, [url], 4)
        cfg.extract.transient_backoff_s = 0.05
        s = extract_job.run_extract(spark, cfg, lake)
    finally:
        srv.stop()
    assert srv.gets["/a.warc.gz"] >= 2  # the failed read, then the retry
    assert s["files_extracted"] == 1 and s["failures"] == 0 and s["files_retryable"] == 0
    assert not lake.exists("failures") or lake.read("failures").count() == 0
    want = {r["uid"] for r in extract_file_table(str(src), Config().extract).to_pylist()
            if r["kind"] == "candidate"}
    got = {r[0] for r in lake.read("candidates").select("uid").collect()}
    assert got == want and len(want) > 0
    (files_row,) = lake.read("extract_files").collect()
    assert files_row["source_file"] == url and files_row["n_failures"] == 0


def test_transient_errors_that_persist_leave_the_file_pending(spark, lake, real_data, tmp_path):
    """Every read fails: on Spark's last attempt the file gets a `transient_io` failure row and
    no extract_files row, so the next run tries it again."""
    from laion_spark.extract import job as extract_job

    shutil.copy(real_data / "IAH-urls-wget.warc.gz", tmp_path / "b.warc.gz")
    srv = _FlakyWarcServer(tmp_path, "503")
    srv.gets = _AlwaysFirst()
    try:
        cfg = _extract_cfg(lake, [f"{srv.base}/b.warc.gz"], 4)
        cfg.extract.transient_retries = 1
        cfg.extract.transient_backoff_s = 0.01
        s = extract_job.run_extract(spark, cfg, lake)
    finally:
        srv.stop()
    assert s["files_retryable"] == 1 and s["files_extracted"] == 0 and s["files_pending"] == 1
    (row,) = lake.read("failures").collect()
    assert row["error"].startswith("transient_io: ")
    assert lake.read("extract_files").count() == 0


class _AlwaysFirst(dict):
    """A hit counter that always says 'first request' (the server answers 503 every time)."""

    def get(self, key, default=None):
        return 0
