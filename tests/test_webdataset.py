"""export-webdataset as Spark tasks: img2dataset's layout, every success row once, re-runs skip
finished shards, a shard whose stats file is missing is rewritten whole; Arrow batches of big
image rows stay under the byte bound on both sides of mapInArrow."""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import tarfile

import pyarrow as pa
import pytest
from pyspark.sql import types as T

from laion_spark.download.webdataset import export_webdataset, sample_key

SCHEMA = T.StructType([
    T.StructField("uid", T.LongType()), T.StructField("url", T.StringType()),
    T.StructField("text", T.StringType()), T.StructField("status", T.StringType()),
    T.StructField("image_format", T.StringType()), T.StructField("downloaded_at", T.TimestampType()),
    T.StructField("shard", T.IntegerType()), T.StructField("image", T.BinaryType()),
])


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 40, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _images(spark, lake, shards=5, per_shard=6):
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for s in range(shards):
        for j in range(per_shard):
            uid = (s * 1_000_003 + j * 7_919) * (-1 if j % 3 == 0 else 1)  # negative uids too
            ok = j != per_shard - 1  # one failed row per shard
            rows.append((uid, f"http://x/{s}/{j}", f"caption {s} {j}", "success" if ok else "failed",
                         "jpg", t0, s, _jpeg(j) if ok else None))
    lake.append("images", spark.createDataFrame(rows, SCHEMA).repartition(3))
    return {r[0]: r for r in rows if r[3] == "success"}


def _read_tars(out):
    import webdataset as wds

    tars = sorted(str(p) for p in out.glob("*.tar"))
    samples = wds.WebDataset(tars, shardshuffle=False).to_tuple("__key__", "jpg", "txt", "json")
    return tars, [(k, img, txt.decode(), json.loads(meta)) for k, img, txt, meta in samples]


def test_export_layout_rerun_and_partial(spark, lake, tmp_path):
    expected = _images(spark, lake)
    out = tmp_path / "wds"
    summary = export_webdataset(lake, str(out), partitions=3)
    assert summary["samples"] == len(expected) == 25 and summary["shards"] == 5
    tars, samples = _read_tars(out)
    assert [os.path.basename(t) for t in tars] == [f"{s:05d}.tar" for s in range(5)]
    assert sorted(k for k, *_ in samples) == sorted(sample_key(u) for u in expected)
    for key, image, text, meta in samples:
        row = expected[meta["uid"]]
        assert key == sample_key(row[0]) and text == row[2] == meta["text"] and image == row[7]
    with tarfile.open(tars[2]) as tar:  # uid order inside a shard
        uids = [json.load(tar.extractfile(m))["uid"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert uids == sorted(uids) and len(uids) == 5
    stats = json.loads((out / "00002_stats.json").read_text())
    assert stats["samples"] == 5 and stats["tars"] == 1
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(out / "00002.parquet").column("uid").to_pylist()) == sorted(uids)
    assert not list(out.glob("*.tmp"))

    # Re-run: every shard has its stats file, nothing is written again.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = export_webdataset(lake, str(out), partitions=3)
    assert again["samples"] == 0 and again["shards"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # A crash after shard 3's tar but before its stats file: that shard alone is rewritten.
    (out / "00003_stats.json").unlink()
    (out / "00003.tar").write_bytes(b"partial")
    third = export_webdataset(lake, str(out), partitions=3)
    assert third["samples"] == 5 and third["shards"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("00003")} == \
        {k: v for k, v in mtimes.items() if not k.startswith("00003")}
    _, samples = _read_tars(out)
    assert len(samples) == 25


def test_export_splits_big_shards_into_parts(spark, lake, tmp_path):
    expected = _images(spark, lake, shards=2, per_shard=6)
    out = tmp_path / "wds"
    summary = export_webdataset(lake, str(out), samples_per_shard=2)
    assert summary["shards"] == 6 and summary["samples"] == 10  # 5 successes per shard -> 3 parts
    tars, samples = _read_tars(out)
    assert [os.path.basename(t) for t in tars] == [f"{s:05d}-{p:03d}.tar" for s in range(2) for p in range(3)]
    assert sorted(m["uid"] for *_, m in samples) == sorted(expected)


def test_bounded_batches_split_by_bytes():
    from laion_spark.batches import bounded_batches, row_sizes

    images = pa.array([b"x" * 1000] * 10 + [b"y" * 5000] + [b"z" * 10] * 3, pa.binary())
    batch = pa.RecordBatch.from_arrays([pa.array(range(14), pa.int64()), images], ["uid", "image"])
    assert row_sizes(batch)[:2].tolist() == [1008, 1008]
    parts = list(bounded_batches([batch.slice(1)], max_bytes=3100))
    assert sum(p.num_rows for p in parts) == 13
    assert all(p.nbytes <= 3100 or p.num_rows == 1 for p in parts)
    assert [p.num_rows for p in parts] == [3, 3, 3, 1, 3]
    assert pa.concat_arrays([p.column("uid") for p in parts]).to_pylist() == list(range(1, 14))


def test_spark_arrow_batches_bounded_in_bytes(spark):
    """Spark -> Python batches of 1 MB rows stay under maxBytesPerBatch (not 8192 rows)."""
    import pyspark

    from laion_spark.spark import ARROW_MAX_BYTES_PER_BATCH

    if int(pyspark.__version__.split(".")[0]) < 4:
        pytest.skip(f"Spark {pyspark.__version__} has no arrow.maxBytesPerBatch (4.0+); the plain-core "
                    "splitter (test_bounded_batches_split_by_bytes) is the bound there")

    assert int(spark.conf.get("spark.sql.execution.arrow.maxBytesPerBatch")) == ARROW_MAX_BYTES_PER_BATCH
    spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch", str(3 << 20))
    try:
        from pyspark.sql import functions as F

        df = spark.range(24, numPartitions=1).select(
            "id", F.expr("unhex(repeat('ab', 1048576))").alias("image"))

        def sizes(batches):
            for b in batches:
                yield pa.RecordBatch.from_pylist([{"rows": b.num_rows, "bytes": b.nbytes}])

        got = df.mapInArrow(sizes, "rows long, bytes long").collect()
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch", str(ARROW_MAX_BYTES_PER_BATCH))
    assert sum(r["rows"] for r in got) == 24 and len(got) >= 8
    assert max(r["bytes"] for r in got) <= 4 << 20


def test_export_to_object_storage(spark, lake, s3_server):
    """The same tasks write straight to s3:// (moto on 127.0.0.1); a re-run writes nothing."""
    import fsspec

    expected = _images(spark, lake, shards=2, per_shard=4)
    out = s3_server.make_bucket("wds") + "/export"
    summary = export_webdataset(lake, out, storage_options=s3_server.fsspec_options, partitions=2)
    assert summary["shards"] == 2 and summary["samples"] == len(expected) == 6
    fs = fsspec.filesystem("s3", **s3_server.fsspec_options)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(out[5:]))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json"]
    with fs.open(f"{out[5:]}/00001.tar", "rb") as f:
        data = f.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        keys = sorted(n.rsplit(".", 1)[0] for n in tar.getnames() if n.endswith(".json"))
    assert keys == sorted(sample_key(u) for u, r in expected.items() if r[6] == 1)
    again = export_webdataset(lake, out, storage_options=s3_server.fsspec_options, partitions=2)
    assert again["samples"] == 0
