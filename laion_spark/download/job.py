"""`laion-spark download`: the `candidates` table -> the `images` table.

The Spark layer is thin: plan shards on the driver, run `downloader.download_batches` inside
`mapInArrow` (one task per shard), commit each group of shards to Delta with the shard ids as
units of work.

Resume: the plan is "candidates whose uid is not in `images` yet", so rows of shards committed by
an earlier (crashed or finished) run are never fetched again, and candidates added since become
new shards. Shard ids continue after the highest id in `images`, so a shard id names one fixed
set of rows for ever; two runs that plan from the same table versions plan the same shards, and
the second commit of a shard is a no-op (Delta app transaction `download:<shard>`).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import replace

from laion_spark.config import Config, DownloadConfig

log = logging.getLogger(__name__)

STAGE = "download"
CANDIDATES = "candidates"
IMAGES = "images"


def _download_fn(cfg: DownloadConfig):
    def run(batches):
        from laion_spark.download.downloader import download_batches

        yield from download_batches(batches, cfg)

    return run


def _images_spark_schema():
    from laion_spark.download.downloader import IMAGES_SCHEMA
    from laion_spark.lake import _spark_schema_from_arrow

    return _spark_schema_from_arrow(IMAGES_SCHEMA)


def _download_df(df, cfg: DownloadConfig, n_partitions: int):
    """Rows with a `shard` column -> the images rows, one Spark task per shard."""
    df = df.repartitionByRange(max(1, n_partitions), "shard")
    return df.mapInArrow(_download_fn(cfg), _images_spark_schema())


def plan_pending(spark, lake, cfg: DownloadConfig):
    """(candidates not yet in images, with a shard id; number of rows; first shard id; shard count)."""
    from pyspark.sql import functions as F

    candidates = lake.read(CANDIDATES).select("uid", "url", "text", "language", "language_group")
    base = 0
    if lake.exists(IMAGES):
        images = lake.read(IMAGES)
        candidates = candidates.join(images.select("uid"), "uid", "left_anti")
        top = images.agg(F.max("shard")).first()[0]
        base = 0 if top is None else int(top) + 1
    pending = candidates.dropDuplicates(["uid"])
    n_rows = pending.count()
    n_shards = max(1, math.ceil(n_rows / max(1, cfg.shard_size)))
    pending = pending.withColumn(
        "shard", (F.lit(base) + F.pmod(F.col("uid"), F.lit(n_shards))).cast("int"))
    return pending, n_rows, base, n_shards


def run_download(spark, cfg: Config, lake) -> dict:
    """Download every candidate not in `images` yet (or, with retry_failed, the failed rows)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    dcfg = cfg.download
    started = time.time()
    if not lake.exists(CANDIDATES):
        raise RuntimeError(f"table '{CANDIDATES}' not found under {lake.root}: run `laion-spark extract` first")
    if dcfg.retry_failed and lake.exists(IMAGES):
        return _retry_failed(spark, cfg, lake, started)
    pending, n_rows, base, n_shards = plan_pending(spark, lake, dcfg)
    summary: dict = {"candidates_version": lake.version(CANDIDATES), "pending_rows": n_rows,
                     "shards": 0, "committed_shards": 0, "skipped_shards": 0}
    if n_rows == 0:
        log.info("download: every candidate already has a row in '%s'", IMAGES)
        summary.update(_counts(lake, []))
        return summary
    pending = pending.persist(StorageLevel.MEMORY_AND_DISK)
    shard_ids = list(range(base, base + n_shards))
    summary["shards"] = n_shards
    todo = [int(u) for u in lake.pending_units(IMAGES, STAGE, [str(s) for s in shard_ids])]
    summary["skipped_shards"] = n_shards - len(todo)
    per_commit = max(1, dcfg.shards_per_commit)
    log.info("download: %d rows in %d shards (ids %d..%d), %d to do, %d per commit",
             n_rows, n_shards, base, base + n_shards - 1, len(todo), per_commit)
    try:
        for i in range(0, len(todo), per_commit):
            wave = todo[i:i + per_commit]
            wave_started = time.time()
            df = _download_df(pending.filter(F.col("shard").isin(wave)), dcfg, len(wave))
            result = lake.append(IMAGES, df, stage=STAGE, units=[str(s) for s in wave],
                                 metadata={"stage": STAGE, "shards": wave})
            summary["committed_shards"] += len(result.committed_units)
            log.info("download: shards %s committed (%d rows, %.1fs)", wave, result.rows,
                     time.time() - wave_started)
    finally:
        pending.unpersist()
    summary.update(_counts(lake, shard_ids))
    elapsed = time.time() - started
    summary["seconds"] = round(elapsed, 2)
    summary["rows_per_s"] = round(n_rows / max(elapsed, 1e-9), 1)
    return summary


def _retry_failed(spark, cfg: Config, lake, started: float) -> dict:
    """Download the `failed` rows again and rewrite `images` with the new rows in their place."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    dcfg = cfg.download
    images = lake.read(IMAGES)
    version = lake.version(IMAGES)
    failed = images.filter(F.col("status") == "failed").select(
        "uid", "url", "text", "language", "language_group", "shard")
    n_rows = failed.count()
    summary: dict = {"mode": "retry_failed", "images_version": version, "retried_rows": n_rows}
    if n_rows == 0:
        summary.update(_counts(lake, []))
        return summary
    n_parts = max(1, math.ceil(n_rows / max(1, dcfg.shard_size)))
    fresh = _download_df(failed, dcfg, n_parts).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        fresh.count()  # download once, before the rewrite reads it
        keep = images.join(fresh.select("uid"), "uid", "left_anti")
        lake.overwrite(IMAGES, keep.unionByName(fresh), stage=STAGE, units=[f"retry:v{version}"],
                       metadata={"stage": STAGE, "retry_failed_of_version": version})
    finally:
        fresh.unpersist()
    summary.update(_counts(lake, []))
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def _counts(lake, shards: list[int]) -> dict:
    """Status counts (of these shards, or the whole table) and the most frequent error codes."""
    from pyspark.sql import functions as F

    if not lake.exists(IMAGES):
        return {"success": 0, "failed": 0, "skipped": 0}
    df = lake.read(IMAGES).select("status", "error", "shard")
    if shards:
        df = df.filter(F.col("shard").between(min(shards), max(shards)))
    out: dict = {"success": 0, "failed": 0, "skipped": 0, "errors": {}}
    code = F.split("error", ":").getItem(0).alias("code")
    for row in df.groupBy("status", code).count().collect():  # one pass for both tallies
        out[row["status"]] = out.get(row["status"], 0) + int(row["count"])
        if row["code"] is not None:
            out["errors"][row["code"]] = out["errors"].get(row["code"], 0) + int(row["count"])
    out["errors"] = dict(sorted(out["errors"].items(), key=lambda kv: -kv[1]))
    return out


# --------------------------------------------------------------------------- CLI and demo
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retry-failed", action="store_true",
                        help="download the failed rows of `images` again and replace them")
    parser.add_argument("--threads", type=int, default=None, help="download threads per Spark task")
    parser.add_argument("--shard-size", type=int, default=None, help="candidates per shard (one task)")
    parser.add_argument("--allow-loopback", action="store_true",
                        help="allow 127.0.0.0/8 and ::1 (tests and the demo only)")


def apply_arguments(cfg: Config, args: argparse.Namespace) -> None:
    d = cfg.download
    if getattr(args, "retry_failed", False):
        d.retry_failed = True
    if getattr(args, "threads", None):
        d.threads_per_task = args.threads
    if getattr(args, "shard_size", None):
        d.shard_size = args.shard_size
    if getattr(args, "allow_loopback", False):
        d.allow_loopback = True


def run(ctx, args: argparse.Namespace) -> dict:
    apply_arguments(ctx.cfg, args)
    return run_download(ctx.spark, ctx.cfg, ctx.lake)


def prepare_demo(cfg: Config, web, out_dir) -> None:
    """The demo web is served on 127.0.0.1 and has slow images: allow loopback, short deadlines."""
    cfg.download = replace(cfg.download, allow_loopback=True, total_deadline_s=4.0, read_timeout_s=2.0,
                           connect_timeout_s=2.0, shard_size=min(cfg.download.shard_size, 250))
