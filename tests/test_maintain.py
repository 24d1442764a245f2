"""`laion-spark maintain`: compaction/z-order, checkpoint, vacuum and staging clean-up keep every
row, keep the units' done-tracking, and remove only what no live or young write needs."""
from __future__ import annotations

import datetime as dt
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import types as T

from laion_spark.maintain import run_maintain

SCHEMA = T.StructType([
    T.StructField("uid", T.LongType()),
    T.StructField("url", T.StringType()),
    T.StructField("shard", T.IntegerType()),
])


def _append_waves(spark, lake, name, waves=6, per_wave=40):
    """`waves` small commits, two files each, uids interleaved across commits (as hashes are)."""
    from pyspark.sql import functions as F

    for w in range(waves):
        rows = spark.range(per_wave, numPartitions=2).select(
            ((F.col("id") * 7919 + w) % 1_000_003).alias("uid"),
            F.concat(F.lit(f"http://h{w}.example/"), F.sha2(F.col("id").cast("string"), 256)).alias("url"),
            F.lit(w).cast("int").alias("shard"))
        lake.append(name, rows, stage="t", units=[f"w{w}"])


def _rows(lake, name):
    return sorted(tuple(r) for r in lake.read(name).collect())


def _age(path, hours):
    old = time.time() - hours * 3600
    for d, _, names in os.walk(path):
        for n in names:
            os.utime(os.path.join(d, n), (old, old))
        os.utime(d, (old, old))


def _fake_failed_attempt(table_dir, folder, hours_old):
    """What a killed delta-rs write leaves: a staging folder with Parquet no commit names and
    Spark's `_temporary` attempt files."""
    base = os.path.join(table_dir, folder)
    os.makedirs(os.path.join(base, "_temporary", "0", "task_1"), exist_ok=True)
    pq.write_table(pa.table({"uid": [1], "url": ["x"], "shard": [0]}), os.path.join(base, "part-00000.parquet"))
    with open(os.path.join(base, "_temporary", "0", "task_1", "part-00001.parquet"), "wb") as f:
        f.write(b"partial")
    _age(base, hours_old)
    return base


def test_maintain_keeps_rows_units_and_cleans(spark, tmp_path):
    """delta-rs: its staging folders, codec-keeping compaction and z-order file ranges."""
    from conftest import make_lake

    lake = make_lake(spark, str(tmp_path / "lake"), "delta-rs")
    _append_waves(spark, lake, "candidates", waves=5, per_wave=4000)
    _append_waves(spark, lake, "images", waves=3)
    table_dir = lake.table_path("candidates")
    now = dt.datetime.now(dt.timezone.utc)
    old_failed = _fake_failed_attempt(table_dir, f"part-{now - dt.timedelta(hours=48):%Y%m%dT%H%M%S}-dead01",
                                      hours_old=48)
    young_failed = _fake_failed_attempt(table_dir, f"part-{now:%Y%m%dT%H%M%S}-dead02", hours_old=0)
    before = {t: _rows(lake, t) for t in ("candidates", "images")}
    files_before = lake.table_summary("candidates")["files"]
    assert files_before == 10

    dry = run_maintain(spark, lake.cfg, lake, dry_run=True, vacuum_hours=0)
    assert dry["candidates"]["version_after"] == dry["candidates"]["version_before"]
    assert dry["candidates"]["small_files"] == 10 and os.path.isdir(old_failed)
    assert lake.table_summary("candidates")["files"] == files_before

    out = run_maintain(spark, lake.cfg, lake, tables=["images"], vacuum_hours=0)
    lake.cfg.max_file_bytes = lake.table_summary("candidates")["bytes"] // 4  # a few files out
    out.update(run_maintain(spark, lake.cfg, lake, tables=["candidates"], vacuum_hours=0))
    for t in ("candidates", "images"):
        assert _rows(lake, t) == before[t], t  # same rows, nothing lost or doubled
    c = out["candidates"]
    assert c["cluster_columns"] == ["uid"] and c["files_after"] < files_before
    assert out["images"]["cluster_columns"] == [] and out["images"]["files_after"] == 1
    # z-order by uid: the compacted files hold disjoint uid ranges, so uid filters skip files.
    ranges = sorted((s["min"]["uid"], s["max"]["uid"]) for s in lake.file_stats("candidates"))
    assert len(ranges) >= 2
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), ranges
    # vacuum (retention 0) removed every replaced file; the old failed attempt's folder is gone,
    # the young one (a write possibly in flight) stays, and every live file is still there.
    assert c["files_vacuumed"] >= files_before
    assert not os.path.exists(old_failed) and os.path.isdir(young_failed)
    live = [s["path"] for s in lake.file_stats("candidates")]
    assert all(os.path.exists(os.path.join(table_dir, p)) for p in live)
    def dead_folders():
        return sorted(d for d in os.listdir(table_dir) if d.startswith("part-")
                      and os.path.isdir(os.path.join(table_dir, d))
                      and not any(p.startswith(d + "/") for p in live))

    # The appends' own emptied folders are younger than the grace period too: kept for now...
    assert os.path.basename(young_failed) in dead_folders() and len(dead_folders()) == 6
    lake.cfg.staging_grace_hours = 0
    run_maintain(spark, lake.cfg, lake, tables=["candidates"], vacuum_hours=0)
    live = [s["path"] for s in lake.file_stats("candidates")]
    assert dead_folders() == []  # ...and removed once past it (vacuum took their Parquet first)
    # a checkpoint exists and the units stay done.
    assert any(n.endswith(".checkpoint.parquet") for n in os.listdir(os.path.join(table_dir, "_delta_log")))
    assert lake.pending_units("candidates", "t", [f"w{w}" for w in range(6)]) == ["w5"]
    # Nothing left to do: a second run rewrites nothing and keeps the rows.
    files = [s["path"] for s in lake.file_stats("images")]
    again = run_maintain(spark, lake.cfg, lake, tables=["images"], vacuum_hours=0)
    assert again["images"]["files_vacuumed"] == 0 and [s["path"] for s in lake.file_stats("images")] == files
    assert _rows(lake, "images") == before["images"]


def test_maintain_default_retention_keeps_time_travel(spark, tmp_path, each_backend):
    """Both backends: compaction keeps rows and units, the default retention keeps old versions."""
    from conftest import make_lake

    lake = make_lake(spark, str(tmp_path / "lake"), each_backend)
    _append_waves(spark, lake, "t", waves=3)
    v_before = lake.version("t")
    rows = _rows(lake, "t")
    first = sorted(tuple(r) for r in lake.read("t", version=0).collect())
    out = run_maintain(spark, lake.cfg, lake, tables=["t"])  # 168 h retention
    assert out["t"]["files_vacuumed"] == 0 and out["t"]["files_after"] == 1 and out["t"]["files_before"] == 6
    assert _rows(lake, "t") == rows
    assert sorted(tuple(r) for r in lake.read("t", version=0).collect()) == first
    assert lake.version("t") > v_before
    assert lake.pending_units("t", "t", ["w0", "w2", "w3"]) == ["w3"]


def test_maintain_cli_and_unknown_table(spark, lake):
    from laion_spark.cli import main
    from laion_spark.lake import LakeError

    _append_waves(spark, lake, "t", waves=2)
    with pytest.raises(LakeError, match="no table"):
        run_maintain(spark, lake.cfg, lake, tables=["nope"])
    assert main(["maintain", "--lake", lake.root, "--table", "t", "--dry-run"]) in (0, None)
    assert lake.table_summary("t")["files"] == 4
