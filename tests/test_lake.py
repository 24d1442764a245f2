"""The table layer on both backends (delta-rs and delta-spark): append, overwrite, read back,
idempotent units, schema errors, file stats, the table read outside Spark (deltalake, Polars,
DuckDB) with identical rows, and a table written by one backend appended to by the other."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from pyspark.sql import Row
from pyspark.sql import types as T

from laion_spark.lake import LakeError, SchemaMismatchError

from conftest import make_lake


@pytest.fixture()
def lake(spark, tmp_path, each_backend):
    """Every test in this module runs on both backends."""
    lake = make_lake(spark, str(tmp_path / "lake"), each_backend)
    assert lake.backend == each_backend
    return lake

SCHEMA = T.StructType([
    T.StructField("uid", T.LongType()),
    T.StructField("url", T.StringType()),
    T.StructField("similarity", T.FloatType()),
    T.StructField("image", T.BinaryType()),
    T.StructField("fetched_at", T.TimestampType()),
])


def rows(start, n):
    t0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    return [
        (i, f"http://example.com/{i}.jpg", float(i) / 100, bytes([i % 256]) * 3,
         t0 + dt.timedelta(seconds=i))
        for i in range(start, start + n)
    ]


def df(spark, start, n, parts=2):
    return spark.createDataFrame(rows(start, n), SCHEMA).repartition(parts)


def sorted_rows(d):
    return sorted(tuple(r) for r in d.collect())


def test_append_read_overwrite(spark, lake):
    assert lake.version("t") is None and not lake.exists("t")
    r1 = lake.append("t", df(spark, 0, 10))
    assert r1.version == 0 and r1.rows == 10
    r2 = lake.append("t", df(spark, 10, 5))
    assert r2.version == 1
    got = lake.read("t")
    assert got.count() == 15
    assert sorted(r.uid for r in got.collect()) == list(range(15))
    # time travel
    assert lake.read("t", version=0).count() == 10
    r3 = lake.overwrite("t", df(spark, 100, 3))
    assert r3.version == 2
    assert sorted(r.uid for r in lake.read("t").collect()) == [100, 101, 102]
    assert lake.tables() == ["t"]


def test_idempotent_units(spark, lake):
    first = lake.append("t", df(spark, 0, 10), stage="extract", units=["a.warc.gz", "b.warc.gz"])
    assert first.version == 0 and first.committed_units == ["a.warc.gz", "b.warc.gz"]
    # The same unit of work again (a re-run after a crash after the commit): nothing committed.
    again = lake.append("t", df(spark, 0, 10), stage="extract", units=["a.warc.gz", "b.warc.gz"])
    assert again.version is None and again.rows == 0
    assert lake.read("t").count() == 10
    assert lake.version("t") == 0
    assert lake.pending_units("t", "extract", ["a.warc.gz", "c.warc.gz", "b.warc.gz"]) == ["c.warc.gz"]
    # units are per stage
    assert lake.pending_units("t", "download", ["a.warc.gz"]) == ["a.warc.gz"]
    # a partial overlap is refused rather than half-duplicated
    with pytest.raises(LakeError, match="already committed"):
        lake.append("t", df(spark, 20, 2), stage="extract", units=["a.warc.gz", "c.warc.gz"])
    assert lake.read("t").count() == 10


def test_empty_write_still_records_units(spark, lake):
    empty = spark.createDataFrame([], SCHEMA)
    res = lake.append("t", empty, stage="extract", units=["empty.warc.gz"])
    assert res.version == 0 and res.rows == 0
    assert lake.read("t").count() == 0
    assert lake.pending_units("t", "extract", ["empty.warc.gz"]) == []


def test_schema_mismatch_is_a_clear_error(spark, lake):
    lake.append("t", df(spark, 0, 3))
    other = spark.createDataFrame([(1, "x")], "uid long, caption string")
    with pytest.raises(SchemaMismatchError) as err:
        lake.append("t", other)
    msg = str(err.value)
    assert "table 't'" in msg and "missing columns" in msg and "caption" in msg
    wrong_type = spark.createDataFrame(
        [(1, "u", "high", b"x", dt.datetime(2024, 1, 1))],
        "uid long, url string, similarity string, image binary, fetched_at timestamp",
    )
    with pytest.raises(SchemaMismatchError, match="similarity"):
        lake.append("t", wrong_type)
    assert lake.read("t").count() == 3


def test_commit_holds_file_stats(spark, lake):
    lake.append("t", df(spark, 0, 10, parts=1))
    stats = lake.file_stats("t")
    assert len(stats) == 1
    add = stats[0]
    assert add["num_records"] == 10
    assert add["min"]["uid"] == 0 and add["max"]["uid"] == 9
    assert add["null_count"]["url"] == 0
    assert add["min"]["url"] == "http://example.com/0.jpg"


def test_read_outside_spark_identical(spark, lake):
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    lake.append("t", df(spark, 0, 20))
    lake.append("t", df(spark, 20, 7))
    spark_rows = sorted_rows(lake.read("t").select("uid", "url", "similarity", "image"))
    dt_ = DeltaTable(lake.table_path("t"))
    arrow = dt_.to_pyarrow_table()
    assert arrow.num_rows == 27
    arrow_rows = sorted(
        (r["uid"], r["url"], r["similarity"], r["image"]) for r in arrow.to_pylist()
    )
    assert arrow_rows == spark_rows
    pl_df = pl.read_delta(lake.table_path("t"))
    assert sorted(pl_df["uid"].to_list()) == list(range(27))
    ds = dt_.to_pyarrow_dataset()
    con = duckdb.connect()
    con.register("t", ds)
    assert con.execute("select count(*), sum(uid) from t").fetchone() == (27, sum(range(27)))
    # timestamps survive as UTC timestamps (TIMESTAMP_MICROS, not INT96 -> protocol stays 1/2)
    assert pa.types.is_timestamp(arrow.schema.field("fetched_at").type)
    assert dt_.protocol().min_reader_version == 1


def test_sql_views(spark, lake):
    lake.append("candidates", df(spark, 0, 5))
    assert lake.register_views() == ["candidates"]
    assert spark.sql("select count(*) c from candidates where uid >= 2").first().c == 3


def test_bad_table_name(lake):
    with pytest.raises(LakeError, match="table name"):
        lake.table_path("../etc")


@pytest.mark.parametrize("first,second", [("delta-rs", "delta-spark"), ("delta-spark", "delta-rs")])
def test_backends_share_one_table(spark, tmp_path, first, second):
    """A table written by one backend is appended to, overwritten and read by the other, and
    deltalake and DuckDB read the same rows as Spark."""
    import duckdb
    from deltalake import DeltaTable

    root = str(tmp_path / "lake")
    a, b = make_lake(spark, root, first), make_lake(spark, root, second)
    a.append("t", df(spark, 0, 6), stage="extract", units=["u1"])
    b.append("t", df(spark, 6, 4), stage="extract", units=["u2"])
    assert a.version("t") == b.version("t") == 1
    want = sorted_rows(df(spark, 0, 10))
    assert sorted_rows(a.read("t")) == sorted_rows(b.read("t")) == want
    # each backend sees the other's units (nothing re-done, nothing refused)
    for lk in (a, b):
        assert lk.pending_units("t", "extract", ["u1", "u2", "u3"]) == ["u3"]
    assert b.append("t", df(spark, 0, 6), stage="extract", units=["u1"]).version is None
    arrow = DeltaTable(a.table_path("t")).to_pyarrow_table()
    assert sorted(arrow.column("uid").to_pylist()) == list(range(10))
    con = duckdb.connect()
    con.register("t", DeltaTable(a.table_path("t")).to_pyarrow_dataset())
    assert con.execute("select count(*), sum(uid) from t").fetchone() == (10, 45)
    b.overwrite("t", df(spark, 50, 2))
    a.append("t", df(spark, 60, 1))
    assert sorted(r.uid for r in a.read("t").collect()) == [50, 51, 60]
    assert sorted(r.uid for r in b.read("t").collect()) == [50, 51, 60]
    assert sorted(r.uid for r in b.read("t", version=1).collect()) == list(range(10))


def test_vacuum_runs_a_bounded_number_of_tasks(spark, lake):
    # Delta's VACUUM lists files in jobs of spark.sql.sources.parallelPartitionDiscovery.parallelism
    # tasks (default 10,000): a 3-file table took 26 jobs / 170,483 tasks before lake.vacuum set it
    # to the cluster's slots (517 after). delta-rs vacuums without Spark: 0 tasks.
    for i in range(3):
        lake.append("t", spark.range(i * 10, i * 10 + 10).toDF("uid"), stage="test")
    sc = spark.sparkContext
    sc.setJobGroup("lake-vacuum-count", "vacuum")
    try:
        lake.vacuum("t", retention_hours=0)
    finally:
        sc.setJobGroup("", "")
    tracker = sc.statusTracker()
    stages = [tracker.getStageInfo(s) for j in tracker.getJobIdsForGroup("lake-vacuum-count")
              for s in tracker.getJobInfo(j).stageIds]
    tasks = sum(s.numTasks for s in stages if s is not None)
    assert tasks < 2_000, tasks
    assert spark.conf.get("spark.sql.sources.parallelPartitionDiscovery.parallelism", "10000") == "10000"
    assert lake.read("t").count() == 30
