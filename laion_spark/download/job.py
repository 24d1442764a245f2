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


class _TallyParam:
    """Accumulator of {(status, error code): rows}: the run's counts, with no pass over the table."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def _download_fn(cfg: DownloadConfig, tally=None):
    """The mapInArrow function: drop repeated uids (a uid's rows all land in one shard, so a set
    per task is a full dedup with no shuffle of its own), download, count into `tally`."""
    def run(batches):
        import pyarrow as pa
        import pyarrow.compute as pc

        from laion_spark.download.downloader import download_batches

        seen: set[int] = set()

        def unique(batches):
            for batch in batches:
                uids = batch.column("uid").to_pylist()
                keep = [u not in seen and not seen.add(u) for u in uids]
                if not all(keep):
                    batch = batch.filter(pa.array(keep))
                if batch.num_rows:
                    yield batch

        counts: dict = {}
        for out in download_batches(unique(batches), cfg):
            if tally is not None:
                codes = pc.split_pattern(out.column("error"), ":", max_splits=1).to_pylist()
                for status, code in zip(out.column("status").to_pylist(), codes):
                    key = (status, code[0] if code else None)
                    counts[key] = counts.get(key, 0) + 1
            yield out
        if tally is not None and counts:
            tally.add(counts)

    return run


def _images_spark_schema():
    from laion_spark.download.downloader import IMAGES_SCHEMA
    from laion_spark.lake import _spark_schema_from_arrow

    return _spark_schema_from_arrow(IMAGES_SCHEMA)


def _by_partition_id(df, n_partitions: int, partition_id):
    """One exchange that sends each row to partition `partition_id` (no sampling job).

    Spark >= 4.1 has repartitionById; older Sparks range-partition (one small sampling job)."""
    n = max(1, n_partitions)
    if hasattr(df, "repartitionById"):
        return df.repartitionById(n, partition_id)
    return df.repartitionByRange(n, partition_id)


def _download_df(df, cfg: DownloadConfig, n_partitions: int, partition_id=None, tally=None):
    """Rows (with a `shard` column) -> the images rows: one exchange, one mapInArrow pass that
    streams into the Parquet writer, one Spark task per partition."""
    from pyspark.sql import functions as F

    if partition_id is None:  # retry: no shard plan, spread the rows evenly
        partition_id = F.pmod(F.col("uid"), F.lit(max(1, n_partitions))).cast("int")
    df = _by_partition_id(df, n_partitions, partition_id)
    return df.mapInArrow(_download_fn(cfg, tally), _images_spark_schema())


def _stats_rows(lake, name: str) -> int | None:
    """Row count of a table from its Delta `add` stats (None when a file has no count)."""
    total = 0
    for f in lake.file_stats(name):
        n = f.get("num_records")
        if n is None:
            return None
        total += int(n)
    return total


def _stats_max_shard(lake) -> int | None:
    """Highest `shard` in `images` from the Delta stats (the Spark max() only if a file lacks them)."""
    from pyspark.sql import functions as F

    top = None
    for f in lake.file_stats(IMAGES):
        if (f.get("num_records") or 0) == 0:
            continue
        hi = (f.get("max") or {}).get("shard")
        if hi is None:
            if (f.get("null_count") or {}).get("shard") == f.get("num_records"):
                continue
            row = lake.read(IMAGES).agg(F.max("shard")).first()
            return None if row[0] is None else int(row[0])
        top = int(hi) if top is None else max(top, int(hi))
    return top


def plan_pending(spark, lake, cfg: DownloadConfig):
    """(candidates not yet in images, with a shard id; number of rows; first shard id; shard count).

    The row count that sizes the shards costs no Spark job on a first run (the candidates' Delta
    stats); a resume counts the left anti-join once. Repeated uids are dropped inside the download
    task (a uid's rows share a shard), so planning adds no shuffle. Shard ids start after the
    highest shard in `images` and after any id already committed as a unit (a shard that came
    out empty leaves no row but does leave its unit)."""
    from pyspark.sql import functions as F

    candidates = lake.read(CANDIDATES).select("uid", "url", "text", "language", "language_group")
    base = 0
    n_rows = None
    if lake.exists(IMAGES):
        images = lake.read(IMAGES)
        candidates = candidates.join(images.select("uid"), "uid", "left_anti")
        top = _stats_max_shard(lake)
        base = 0 if top is None else top + 1
        n_rows = candidates.count()
    else:
        n_rows = _stats_rows(lake, CANDIDATES)
        if n_rows is None:
            n_rows = candidates.count()
    while lake.committed_units(IMAGES, STAGE, [str(base)]):
        base += 1
    n_shards = max(1, math.ceil(n_rows / max(1, cfg.shard_size)))
    pending = candidates.withColumn(
        "shard", (F.lit(base) + F.pmod(F.col("uid"), F.lit(n_shards))).cast("int"))
    return pending, n_rows, base, n_shards


def _run_waves(lake, dcfg: DownloadConfig, pending, waves: list[list[int]], tally, summary: dict,
               phases: dict, t: float) -> None:
    """One Spark write + one Delta commit per wave of shards (the resume granularity)."""
    from pyspark.sql import functions as F

    for wave in waves:
        wave_started = time.time()
        # partition id = shard - first shard of the wave: one task per shard, no sampling
        rows = pending.filter(F.col("shard").isin(wave))
        df = _download_df(rows, dcfg, wave[-1] - wave[0] + 1,
                          (F.col("shard") - F.lit(wave[0])).cast("int"), tally)
        result = lake.append(IMAGES, df, stage=STAGE, units=[str(s) for s in wave],
                             metadata={"stage": STAGE, "shards": wave}, compression=dcfg.compression)
        summary["committed_shards"] += len(result.committed_units)
        summary["pending_rows"] += result.rows
        log.info("download: shards %s committed (%d rows, %.1fs)", wave, result.rows,
                 time.time() - wave_started)
        t = _timed(phases, "download_write_commit", t)


def _timed(phases: dict, name: str, started: float) -> float:
    now = time.time()
    phases[name] = round(phases.get(name, 0.0) + now - started, 3)
    log.info("download: phase %s done (%.2fs)", name, now - started, extra={"phase": name})
    return now


def run_download(spark, cfg: Config, lake) -> dict:
    """Download every candidate not in `images` yet (or, with retry_failed, the failed rows)."""
    from pyspark import StorageLevel

    dcfg = cfg.download
    started = time.time()
    if not lake.exists(CANDIDATES):
        raise RuntimeError(f"table '{CANDIDATES}' not found under {lake.root}: run `laion-spark extract` first")
    if dcfg.retry_failed and lake.exists(IMAGES):
        return _retry_failed(spark, cfg, lake, started)
    phases: dict = {}
    t = started
    pending, n_rows, base, n_shards = plan_pending(spark, lake, dcfg)
    t = _timed(phases, "plan", t)
    summary: dict = {"candidates_version": lake.version(CANDIDATES), "planned_rows": n_rows,
                     "pending_rows": 0, "shards": 0, "committed_shards": 0, "skipped_shards": 0,
                     "phases": phases}
    if n_rows == 0:
        log.info("download: every candidate already has a row in '%s'", IMAGES)
        summary.update(_counts(lake, []))
        return summary
    shard_ids = list(range(base, base + n_shards))
    summary["shards"] = n_shards
    todo = [int(u) for u in lake.pending_units(IMAGES, STAGE, [str(s) for s in shard_ids])]
    summary["skipped_shards"] = n_shards - len(todo)
    per_commit = max(1, dcfg.shards_per_commit)
    log.info("download: %d rows in %d shards (ids %d..%d), %d to do, %d per commit",
             n_rows, n_shards, base, base + n_shards - 1, len(todo), per_commit)
    tally = spark.sparkContext.accumulator({}, _TallyParam())
    waves = [todo[i:i + per_commit] for i in range(0, len(todo), per_commit)]
    if len(waves) > 1:  # each wave filters the plan: read and anti-join the candidates once
        pending = pending.persist(StorageLevel.MEMORY_AND_DISK)
    t = _timed(phases, "units", t)
    try:
        _run_waves(lake, dcfg, pending, waves, tally, summary, phases, t)
    finally:
        if len(waves) > 1:
            pending.unpersist()
    counts: dict = {"success": 0, "failed": 0, "skipped": 0, "errors": {}}
    for (status, code), n in tally.value.items():
        counts[status] = counts.get(status, 0) + n
        if code is not None:
            counts["errors"][code] = counts["errors"].get(code, 0) + n
    counts["errors"] = dict(sorted(counts["errors"].items(), key=lambda kv: -kv[1]))
    summary.update(counts)
    elapsed = time.time() - started
    summary["seconds"] = round(elapsed, 2)
    summary["rows_per_s"] = round(summary["pending_rows"] / max(elapsed, 1e-9), 1)
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
                       compression=dcfg.compression,
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
