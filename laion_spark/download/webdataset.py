"""`laion-spark export-webdataset`: the `images` table -> webdataset tar shards, written by Spark
tasks in parallel to any fsspec path (a local folder, s3://, gs://).

Layout (img2dataset's): one `NNNNN.tar` per `images` shard (a shard with more successes than
`samples_per_shard` becomes `NNNNN-PPP.tar` parts), each sample `{key}.jpg|webp`, `{key}.txt`
(the alt text) and `{key}.json` (every metadata column), samples in uid order; beside them
`NNNNN.parquet` (the shard's metadata rows, no bytes) and `NNNNN_stats.json` (counts), written
last. The key is the uid as 16 hex digits (no dots, stable, joins back to the tables).

Crash safety and re-runs: a tar is written to a local temp file and only then moved/uploaded to
its final name (never a partial tar under a final name); `NNNNN_stats.json` is written after
every part and the parquet, so it marks the shard done. A re-run drops the rows of done shards
before the shuffle (each task checks the stats file of the shards it meets), so their image bytes
are neither moved nor re-written.

Spark: `images` (success rows) -> mapInArrow(drop done shards) -> one exchange by shard ->
sort by (shard, uid) inside each task -> mapInArrow(write tars) -> one stats row per shard,
summed by Spark (the driver receives one row).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from typing import Iterator, Optional

import pyarrow as pa

log = logging.getLogger(__name__)

META_COLUMNS = ["uid", "url", "text", "language", "language_group", "status", "error", "http_status",
                "image_format", "width", "height", "original_width", "original_height",
                "image_bytes_sha256", "downloaded_at", "shard"]
STATS_SCHEMA = pa.schema([("shard", pa.int64()), ("tars", pa.int64()), ("samples", pa.int64()),
                          ("bytes", pa.int64()), ("skipped", pa.int64())])


def sample_key(uid: int) -> str:
    return f"{uid & 0xFFFFFFFFFFFFFFFF:016x}"


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardOutput:
    """Where a task's files go: `output` on any fsspec filesystem, whole files only."""

    def __init__(self, output: str, storage_options: Optional[dict] = None):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def publish(self, local_file: str, name: str) -> None:
        """Move a finished local file to its final name (rename locally, one upload remotely)."""
        final = self.path(name)
        if self.local:
            tmp = f"{final}.{os.getpid()}.tmp"
            shutil.move(local_file, tmp)  # a copy across devices, so rename from the same folder
            os.replace(tmp, final)
        else:
            self.fs.put_file(local_file, final)

    def write_bytes(self, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(delete=False, prefix="wds-") as f:
            f.write(data)
        try:
            self.publish(f.name, name)
        finally:
            if os.path.exists(f.name):
                os.remove(f.name)


def _meta(row: dict, key: str) -> dict:
    meta = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
    meta["key"] = key
    return meta


def write_shard(out: ShardOutput, shard: int, rows: list[dict], images: list[bytes],
                samples_per_shard: int) -> dict:
    """One images shard's success rows (in uid order) -> its tar part(s), parquet and stats."""
    name = shard_name(shard)
    parts = max(1, -(-len(rows) // max(1, samples_per_shard)))
    tmpdir = tempfile.mkdtemp(prefix=f"wds-{name}-")
    n_bytes = 0
    try:
        for p in range(parts):
            tar_name = f"{name}.tar" if parts == 1 else f"{name}-{p:03d}.tar"
            local = os.path.join(tmpdir, tar_name)
            with tarfile.open(local, "w") as tar:
                for row, image in zip(rows[p * samples_per_shard:(p + 1) * samples_per_shard],
                                      images[p * samples_per_shard:(p + 1) * samples_per_shard]):
                    key = sample_key(row["uid"])
                    ext = row.get("image_format") or "jpg"
                    at = row.get("downloaded_at")
                    mtime = at.timestamp() if at is not None else 0
                    _add(tar, f"{key}.{ext}", image, mtime)
                    _add(tar, f"{key}.txt", (row.get("text") or "").encode("utf-8"), mtime)
                    _add(tar, f"{key}.json", json.dumps(_meta(row, key), ensure_ascii=False).encode("utf-8"),
                         mtime)
            n_bytes += os.path.getsize(local)
            out.publish(local, tar_name)
        import pyarrow.parquet as pq

        local = os.path.join(tmpdir, f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), local)
        out.publish(local, f"{name}.parquet")
        stats = {"shard": shard, "tars": parts, "samples": len(rows), "bytes": n_bytes,
                 "samples_per_shard": samples_per_shard}
        out.write_bytes(f"{name}_stats.json", json.dumps(stats).encode())  # last: marks it done
        return stats
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _stats_row(shard: int, tars: int, samples: int, n_bytes: int, skipped: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [{"shard": shard, "tars": tars, "samples": samples, "bytes": n_bytes, "skipped": skipped}],
        schema=STATS_SCHEMA)


def drop_done_shards(batches: Iterator[pa.RecordBatch], out: ShardOutput) -> Iterator[pa.RecordBatch]:
    """Rows of shards whose `_stats.json` is not there yet (one existence check per shard per task)."""
    import pyarrow.compute as pc

    done: dict[int, bool] = {}
    for batch in batches:
        shards = batch.column("shard")
        for s in pc.unique(shards).to_pylist():
            if s not in done:
                done[s] = out.exists(f"{shard_name(s)}_stats.json")
        todo = [s for s, d in done.items() if not d]
        if not todo:
            continue
        batch = batch.filter(pc.is_in(shards, pa.array(todo, shards.type)))
        if batch.num_rows:
            yield batch


def write_shards(batches: Iterator[pa.RecordBatch], out: ShardOutput,
                 samples_per_shard: int) -> Iterator[pa.RecordBatch]:
    """Rows sorted by (shard, uid) -> tars per shard; yields one stats row per shard written.

    Holds one shard's rows at a time (a download shard: ~1-10k resized images)."""
    current: Optional[int] = None
    rows: list[dict] = []
    images: list[bytes] = []

    def flush():
        stats = write_shard(out, current, rows, images, samples_per_shard)
        return _stats_row(current, stats["tars"], stats["samples"], stats["bytes"], 0)

    for batch in batches:
        shard_col = batch.column("shard").to_pylist()
        img_col = batch.column("image").to_pylist()
        meta = batch.drop_columns(["image"]).to_pylist()
        for s, row, image in zip(shard_col, meta, img_col):
            if s != current:
                if current is not None:
                    yield flush()
                current, rows, images = s, [], []
            if image:
                rows.append(row)
                images.append(image)
    if current is not None:
        yield flush()


def export_webdataset(lake, output_dir: str, samples_per_shard: int = 10_000,
                      version: Optional[int] = None, table: str = "images",
                      storage_options: Optional[dict] = None, partitions: Optional[int] = None) -> dict:
    """Write the success rows of `table` as tar shards under `output_dir`; returns counts."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from laion_spark.batches import bounded_batches

    started = time.time()
    spark = lake.spark
    options = dict(lake.storage_options if storage_options is None else storage_options)
    ShardOutput(output_dir, options)  # fail early (bad path, credentials) on the driver
    df = lake.read(table, version)
    columns = [c for c in META_COLUMNS if c in df.columns] + ["image"]
    df = df.filter(F.col("status") == "success").select(*columns)
    schema = df.schema

    def keep_pending(batches):
        yield from drop_done_shards(batches, ShardOutput(output_dir, options))

    def write(batches):
        yield from write_shards(bounded_batches(batches), ShardOutput(output_dir, options), samples_per_shard)

    n = partitions or spark.sparkContext.defaultParallelism * 2
    pending = df.mapInArrow(keep_pending, schema)
    by_shard = pending.repartition(max(1, n), "shard").sortWithinPartitions("shard", "uid")
    stats_schema = T.StructType([T.StructField(f.name, T.LongType()) for f in STATS_SCHEMA])
    spark.sparkContext.setJobDescription(f"export-webdataset {table} -> {output_dir}")
    try:
        total = by_shard.mapInArrow(write, stats_schema).agg(
            F.count("*").alias("shards"), F.sum("tars").alias("tars"), F.sum("samples").alias("samples"),
            F.sum("bytes").alias("bytes")).first()
    finally:
        spark.sparkContext.setJobDescription(None)
    summary = {"output": output_dir, "shards": int(total["tars"] or 0), "samples": int(total["samples"] or 0),
               "images_shards": int(total["shards"] or 0), "bytes": int(total["bytes"] or 0),
               "seconds": round(time.time() - started, 2)}
    log.info("export-webdataset: %s (images shards already exported were skipped)", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True, help="folder or s3:// prefix for the .tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--version", type=int, default=None, help="export an older version of `images`")
    parser.add_argument("--partitions", type=int, default=None,
                        help="Spark tasks writing tars (default: 2x the cluster's cores)")


def run(ctx, args: argparse.Namespace) -> dict:
    return export_webdataset(ctx.lake, args.output, args.samples_per_shard, args.version,
                             partitions=getattr(args, "partitions", None))
