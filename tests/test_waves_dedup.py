"""Extract's uid dedup without a per-wave anti-join, counted (not timed) from Spark's SQL scan
metrics (REST status API on 127.0.0.1):

* an extract wave reads no file and no row of `candidates`, whether the table holds N or ~4N
  rows (the old per-wave anti-join, `extract.dedup_against_table`, is counted too: it reads every
  file of the table, so the counter sees table scans when there are any);
* a uid repeated across waves is visible to no reader that needs one row per uid: the
  `current_candidates` view, download's plan and `images` hold it once;
* `maintain` rewrites the repeats away (the row `read_current` picks), keeps the waves' Delta app
  ids, and is a no-op the second time.

Backend: the `lake` fixture's (LAION_LAKE_BACKEND=delta-rs | delta-spark; CI=true fails without jars).
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download_server import MisbehavingServer  # noqa: E402
from test_download_job import _candidates_df  # noqa: E402
from test_waves import _max_sql_id, _sql_since  # noqa: E402

from laion_spark.config import Config, DownloadConfig  # noqa: E402
from laion_spark.lake import wave_app_id  # noqa: E402

_SECTION = re.compile(r"^\(\d+\) (.*)$", re.M)


def _scan_locations(plan: str) -> list[str]:
    """The `Location:` of every file scan in a formatted physical plan."""
    out = []
    parts = _SECTION.split(plan)
    for head, body in zip(parts[1::2], parts[2::2]):
        if head.startswith("Scan") or "FileScan" in head:
            m = re.search(r"^Location: (.*)$", body, re.M)
            if m:
                out.append(m.group(1))
    return out


def _metric(node: dict, name: str) -> int:
    for m in node.get("metrics", []):
        if m["name"] == name:
            return int(re.sub(r"[^0-9]", "", str(m["value"]).split("\n")[0]) or 0)
    return 0


def _reads_table(location: str, table_path: str) -> bool:
    """A scan `Location:` names the table's data: its root (delta-spark's PreparedDeltaFileIndex
    [file:/…/candidates]) or files under it (delta-rs: InMemoryFileIndex [file:/…/candidates/part-…]),
    not its `_delta_log` (Delta's own log replay)."""
    inside = location[location.find("[") + 1:location.rfind("]")] if "[" in location else location
    for p in (x.strip() for x in inside.split(",")):
        p = p[len("file:"):] if p.startswith("file:") else p
        p = "/" + p.lstrip("/")
        if (p == table_path or p.startswith(table_path + "/")) and "/_delta_log" not in p:
            return True
    return False


def candidate_reads(executions: list[dict], table_path: str) -> dict:
    """Files and rows read by the SQL executions whose plan scans `table_path`'s data (not its
    `_delta_log`): the scans' `number of files read` / `number of output rows`."""
    files = rows = scans = 0
    for e in executions:
        locs = [loc for loc in _scan_locations(e.get("planDescription", "")) if _reads_table(loc, table_path)]
        if not locs:
            continue
        scans += len(locs)
        for node in e.get("nodes", []):
            if node["nodeName"].startswith("Scan parquet"):
                files += _metric(node, "number of files read")
                rows += _metric(node, "number of output rows")
    return {"executions": scans, "files": files, "rows": rows}


def _grow(spark, lake, rows: int, files: int, salt: int) -> None:
    """Append `rows` synthetic candidates (fresh uniform uids) in `files` files, one commit."""
    from pyspark.sql import functions as F

    if not lake.exists("candidates"):
        from laion_spark.extract.extractor import CANDIDATE_COLUMNS

        seed = _candidates_df(spark, [("http://x.example/seed.jpg", "seed")])
        for c in ("title", "source_format", "url_source"):  # the extract schema's other columns
            seed = seed.withColumn(c, F.lit("warc" if c == "source_format" else None).cast("string"))
        lake.append("candidates", seed.select(*CANDIDATE_COLUMNS), stage="test-grow")
        rows -= 1
    base = lake.read("candidates").limit(1)
    grown = (spark.range(rows, numPartitions=files).crossJoin(base.drop("uid"))
             .withColumn("uid", F.xxhash64(F.col("id"), F.lit(salt)))
             .withColumn("record_offset", F.col("id")).drop("id")
             .select(*lake.read("candidates").columns))
    lake.append("candidates", grown, stage="test-grow")


def _extract_one(spark, lake, path, *, against_table: bool = False):
    from laion_spark.extract import job as extract_job

    cfg = Config()
    cfg.lake = lake.cfg
    cfg.extract.inputs = [str(path)]
    cfg.extract.dedup_against_table = against_table
    sql0 = _max_sql_id(spark)
    s = extract_job.run_extract(spark, cfg, lake)
    waves = [e for e in _sql_since(spark, sql0) if e["description"].startswith("extract wave")]
    assert s["waves"] == 1 and s["files_extracted"] == 1 and waves
    return s, candidate_reads(waves, lake.table_path("candidates"))


def test_extract_wave_reads_nothing_of_candidates_as_the_table_grows(spark, lake, real_data, tmp_path):
    from laion_spark.extract.extractor import extract_file_table

    src = real_data / "IAH-urls-wget.warc.gz"
    copies = [tmp_path / f"c{i}.warc.gz" for i in range(3)]
    for c in copies:
        shutil.copy(src, c)
    want = {r["uid"] for r in extract_file_table(str(src), Config().extract).to_pylist()
            if r["kind"] == "candidate"}

    # The same new input (one file) against a table of N rows, then of 4N rows.
    _grow(spark, lake, 4000, 4, salt=1)
    size1 = lake.table_summary("candidates")
    s1, reads1 = _extract_one(spark, lake, copies[0])
    _grow(spark, lake, 3 * size1["rows"], 12, salt=2)
    size4 = lake.table_summary("candidates")
    assert size4["rows"] == 4 * size1["rows"] + len(want)
    s4, reads4 = _extract_one(spark, lake, copies[1])
    print(f"\ncounted: table {size1['rows']} rows / {size1['files']} files: {reads1}; "
          f"{size4['rows']} rows / {size4['files']} files: {reads4}; wave of {len(want)} candidates")
    assert reads1 == reads4 == {"executions": 0, "files": 0, "rows": 0}, (reads1, reads4)
    # each wave deduped inside itself and wrote its uids (the second: repeats of the first)
    assert s1["candidates_written"] == s4["candidates_written"] == len(want) > 0

    # The counter sees a table scan when there is one: the old per-wave anti-join reads every
    # file and row of the table (and writes nothing here: every uid is known).
    size = lake.table_summary("candidates")
    old, reads_old = _extract_one(spark, lake, copies[2], against_table=True)
    print(f"counted, dedup_against_table: table {size['rows']} rows / {size['files']} files: {reads_old}")
    assert old["candidates_written"] == 0
    assert reads_old["files"] == size["files"] and reads_old["rows"] == size["rows"], (reads_old, size)

    # One row per uid for readers: the current view picks the min_by row of every uid.
    lake.register_views()
    current = spark.sql("SELECT uid, source_file FROM current_candidates WHERE source_file LIKE '%/c_.warc.gz'")
    cur = {r["uid"]: r["source_file"] for r in current.collect()}
    assert cur == {u: str(copies[0]) for u in want}
    assert spark.sql("SELECT count(*) FROM current_candidates").first()[0] == size["rows"] - len(want)


def test_maintain_rewrites_repeated_uids_away_and_keeps_wave_txns(spark, lake):
    """Three waves (Delta app ids) with overlapping uids: maintain keeps the row read_current
    picks for every uid, files with disjoint uid ranges, the waves' app ids; a second dedup finds
    nothing to do."""
    from laion_spark.maintain import run_maintain

    rows = [(f"http://h.example/{i}.jpg", f"caption {i}") for i in range(300)]
    for w, (lo, hi) in enumerate([(0, 200), (100, 300), (150, 250)]):
        df = _candidates_df(spark, rows[lo:hi]).withColumn("source_file", F_lit(f"w{w}.warc.gz"))
        lake.append("candidates", df.repartition(2), stage="extract", txn=wave_app_id("extract", f"w{w}"))
    assert lake.table_summary("candidates")["rows"] == 500
    picked = {r["uid"]: (r["source_file"], r["record_offset"])
              for r in lake.read_current("candidates").collect()}
    assert len(picked) == 300
    lake.cfg.max_file_bytes = lake.table_summary("candidates")["bytes"] // 4  # a few files out
    out = run_maintain(spark, lake.cfg, lake, tables=["candidates"], vacuum_hours=0)["candidates"]
    assert out["duplicates_removed"] == 200 and out["rows"] == 300
    after = {r["uid"]: (r["source_file"], r["record_offset"]) for r in lake.read("candidates").collect()}
    assert after == picked
    ranges = sorted((s["min"]["uid"], s["max"]["uid"]) for s in lake.file_stats("candidates"))
    assert len(ranges) > 1 and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), ranges
    assert all(lake.transaction_version("candidates", wave_app_id("extract", f"w{w}")) == 1 for w in range(3))
    again = lake.dedup("candidates")
    assert again["duplicates"] == 0 and again["files_added"] == 0


def F_lit(value):
    from pyspark.sql import functions as F

    return F.lit(value)


def test_repeated_uids_reach_download_once(spark, lake, tmp_path):
    """Two extract waves holding the same uids (a later crawl): the plan and `images` hold each
    uid once, so score and index (which read `images` / `pairs`) never see a repeat."""
    from laion_spark.download.job import PLAN, run_download

    srv = MisbehavingServer().start()
    try:
        rows = [(srv.base + f"/ok-{i}", f"caption {i}") for i in range(12)]
        lake.append("candidates", _candidates_df(spark, rows[:8]), stage="test", txn="t:wave:a")
        lake.append("candidates", _candidates_df(spark, rows[4:]), stage="test", txn="t:wave:b")
        assert lake.table_summary("candidates")["rows"] == 16
        cfg = Config()
        cfg.download = DownloadConfig(allow_loopback=True, total_deadline_s=2.5, read_timeout_s=1.5,
                                      connect_timeout_s=1.5, threads_per_task=4, shard_size=4)
        s = run_download(spark, cfg, lake)
    finally:
        srv.stop()
    plan = [r["uid"] for r in lake.read(PLAN).select("uid").collect()]
    assert len(plan) == len(set(plan)) == 12 == s["planned_rows"]
    images = [r["uid"] for r in lake.read("images").select("uid").collect()]
    assert len(images) == len(set(images)) == 12 and s["success"] == 12
