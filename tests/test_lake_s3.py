"""The lake on S3 (the local moto server): Spark through s3a (delta-spark) and delta-rs through
its storage options, endpoint and credentials from config only; extract and download on it."""
from __future__ import annotations

import pytest

from conftest import make_lake

ROOTS = {"delta-spark": "s3a://{bucket}/lake", "delta-rs": "s3://{bucket}/lake"}


@pytest.fixture()
def s3_spark(spark, s3_server):
    """The session's Hadoop conf pointed at the local server (a job gets the same keys from
    spark.extra_conf: spark.hadoop.fs.s3a.*)."""
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for k, v in s3_server.spark_conf.items():
        conf.set(k[len("spark.hadoop."):], v)
    return spark


def _bucket(s3_server, request, backend):
    name = f"lake-{request.node.name.split('[')[0][-20:]}-{backend}".replace("_", "-").lower()
    s3_server.make_bucket(name)
    return name


def test_lake_round_trip_on_s3(s3_spark, s3_server, each_backend, request):
    from deltalake import DeltaTable
    from pyspark.sql import types as T

    bucket = _bucket(s3_server, request, each_backend)
    lake = make_lake(s3_spark, ROOTS[each_backend].format(bucket=bucket), each_backend,
                     s3_server.storage_options)
    schema = T.StructType([T.StructField("uid", T.LongType()), T.StructField("url", T.StringType())])
    rows = lambda a, b: s3_spark.createDataFrame([(i, f"http://x/{i}") for i in range(a, b)], schema)
    assert lake.append("t", rows(0, 5), stage="t", units=["u1"]).version == 0
    assert lake.append("t", rows(5, 8), stage="t", units=["u2"]).version == 1
    assert lake.append("t", rows(0, 5), stage="t", units=["u1"]).version is None
    assert sorted(r.uid for r in lake.read("t").collect()) == list(range(8))
    assert lake.tables() == ["t"]
    assert lake.pending_units("t", "t", ["u1", "u2", "u3"]) == ["u3"]
    # delta-rs reads what Spark wrote on S3 (and the other way round: lake.read on delta-rs)
    table = DeltaTable(f"s3://{bucket}/lake/t", storage_options=s3_server.storage_options)
    assert table.version() == 1
    assert sorted(table.to_pyarrow_table().column("uid").to_pylist()) == list(range(8))


def test_extract_and_download_with_the_lake_on_s3(s3_spark, s3_server, each_backend, request, tmp_path):
    from deltalake import DeltaTable

    from laion_spark.config import load_config
    from laion_spark.demo.pipeline import run_demo
    from laion_spark.job import JobContext

    bucket = _bucket(s3_server, request, each_backend)
    cfg = load_config(None, [
        f"lake.root={ROOTS[each_backend].format(bucket=bucket)}",
        f"lake.backend={each_backend}",
        f"demo.out_dir={tmp_path / 'web'}",
    ])
    cfg.lake.storage_options = dict(s3_server.storage_options)
    ctx = JobContext(cfg, _spark=s3_spark)
    assert ctx.lake.backend == each_backend
    result = run_demo(ctx, n_pages=8, stages=["extract", "download"])
    assert isinstance(result["extract"], dict) and isinstance(result["download"], dict)
    assert {"candidates", "images"} <= set(ctx.lake.tables())
    so = s3_server.storage_options
    candidates = DeltaTable(f"s3://{bucket}/lake/candidates", storage_options=so).to_pyarrow_table()
    images = DeltaTable(f"s3://{bucket}/lake/images", storage_options=so).to_pyarrow_table(
        columns=["uid", "status"])
    assert candidates.num_rows > 0
    # one images row per candidate, and Spark reads the same tables
    assert sorted(images.column("uid").to_pylist()) == sorted(candidates.column("uid").to_pylist())
    assert ctx.lake.read("images").count() == images.num_rows
    assert "success" in set(images.column("status").to_pylist())
