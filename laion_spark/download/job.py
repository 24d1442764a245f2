"""`laion-spark download`: the `candidates` table -> the `images` table.

The Spark layer is thin: a plan written once, then the wave runner (`laion_spark/waves.py`) runs
`downloader.download_batches` inside `mapInArrow`, one task per shard, one commit per wave.

* Plan: "candidates whose uid is not in `images` yet" (one row per uid: `lake.read_current`) (or, with `--retry-failed`, the uids whose
  current row failed), each row given a shard id, written ONCE to `download_plan` with one file
  per shard. A wave reads only its shards' plan files (Delta stats on the bare `shard` column),
  so no wave scans the whole plan. Shard ids continue after the highest id in `images` and in the
  plan, so a shard id names one fixed set of rows for ever.
* Waves: task slots × `download.shards_per_slot` shards (capped by `max_shards_per_wave`), one
  task per shard, so each `images` file holds one shard (score's reads skip every other file).
* Commit order: `images` (the wave's Delta app id: a replayed wave commits nothing twice), then
  `download_units` LAST (one row per shard: counts by status and error code; the resume record).
  A new plan is made only when every shard of the last one is in `download_units`.
* `--retry-failed` appends new rows under new shards, never rewrites `images`. The current row of
  a uid is the one with the highest shard (`current_images`); readers that need one row per uid
  use it. Only failed rows are retried, so a uid has at most one `success` row.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import time
from dataclasses import replace

from laion_spark.config import Config, DownloadConfig

log = logging.getLogger(__name__)

STAGE = "download"
CANDIDATES = "candidates"
IMAGES = "images"
PLAN = "download_plan"
UNITS = "download_units"
PLAN_COLUMNS = ["uid", "url", "text", "language", "language_group", "shard"]


def _download_fn(cfg: DownloadConfig):
    """The mapInArrow function: drop repeated uids (a uid's rows all land in one shard, so a set
    per task is a full dedup with no shuffle of its own), then download."""
    def run(batches):
        import pyarrow as pa

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

        from laion_spark.batches import bounded_batches  # image rows: bounded in bytes, not only rows

        yield from bounded_batches(download_batches(unique(batches), cfg))

    return run


def _images_spark_schema():
    from laion_spark.download.downloader import IMAGES_SCHEMA
    from laion_spark.lake import _spark_schema_from_arrow

    return _spark_schema_from_arrow(IMAGES_SCHEMA)


def _shard_partition(shards: list[int]):
    """Partition id of each row: the position of its shard in `shards` (one task per shard)."""
    from pyspark.sql import functions as F

    pairs = []
    for i, s in enumerate(shards):
        pairs += [F.lit(int(s)), F.lit(i)]
    return F.create_map(*pairs)[F.col("shard")]


def _plan_shards(lake) -> list[int]:
    """The shard ids of the current plan: min..max of its files' Delta stats (no Spark job). A
    shard that pmod left empty is still a unit: its wave writes no images row and its
    `download_units` row says 0 rows."""
    lo = hi = None
    for f in lake.file_stats(PLAN):
        if not f.get("num_records"):
            continue
        a, b = (f.get("min") or {}).get("shard"), (f.get("max") or {}).get("shard")
        if a is None or b is None:
            raise RuntimeError(f"table '{PLAN}': a file without shard stats")
        lo = int(a) if lo is None else min(lo, int(a))
        hi = int(b) if hi is None else max(hi, int(b))
    return [] if lo is None else list(range(lo, hi + 1))


def _stats_max_shard(lake, name: str) -> int | None:
    """Highest `shard` in a table from the Delta stats (the Spark max() only if a file lacks them)."""
    from pyspark.sql import functions as F

    if not lake.exists(name):
        return None
    top = None
    for f in lake.file_stats(name):
        if (f.get("num_records") or 0) == 0:
            continue
        hi = (f.get("max") or {}).get("shard")
        if hi is None:
            if (f.get("null_count") or {}).get("shard") == f.get("num_records"):
                continue
            row = lake.read(name).agg(F.max("shard")).first()
            return None if row[0] is None else int(row[0])
        top = int(hi) if top is None else max(top, int(hi))
    return top


def _stats_rows(lake, name: str) -> int | None:
    """Row count of a table from its Delta `add` stats (None when a file has no count)."""
    total = 0
    for f in lake.file_stats(name):
        n = f.get("num_records")
        if n is None:
            return None
        total += int(n)
    return total


def current_images(lake):
    """The current row of every uid in `images`: the one with the highest shard (a retry appends
    a new row under a new shard; the old one stays for history)."""
    from pyspark.sql import functions as F

    images = lake.read(IMAGES)
    cols = [c for c in images.columns if c != "uid"]
    return (images.groupBy("uid").agg(F.max_by(F.struct(*cols), F.col("shard")).alias("_r"))
            .select("uid", *[F.col(f"_r.{c}").alias(c) for c in cols]).select(*images.columns))


def plan_pending(spark, lake, cfg: DownloadConfig, retry_failed: bool = False):
    """(rows to download with a shard id, row count (an upper bound on a first run), first shard
    id, shard count).

    New candidates: one row per uid of `candidates` (`lake.read_current`: a uid may repeat across
    extract waves) whose uid has no `images` row. Retry: the uids whose current row failed."""
    from pyspark.sql import functions as F

    base = max([-1] + [s for s in (_stats_max_shard(lake, IMAGES), _stats_max_shard(lake, PLAN))
                       if s is not None]) + 1
    if retry_failed:
        rows = (current_images(lake).filter(F.col("status") == "failed")
                .select(*PLAN_COLUMNS[:-1]))
        n_rows = rows.count()
    else:
        rows = lake.read_current(CANDIDATES, PLAN_COLUMNS[:-1])
        if lake.exists(IMAGES):
            rows = rows.join(lake.read(IMAGES).select("uid"), "uid", "left_anti")
            n_rows = rows.count()
        else:
            # First run: no job to count, the Delta stats' row count is an upper bound (repeated
            # uids make shards a little smaller than shard_size; the plan's commit says how many).
            n_rows = _stats_rows(lake, CANDIDATES)
            if n_rows is None:
                n_rows = rows.count()
    n_shards = max(1, math.ceil(n_rows / max(1, cfg.shard_size)))
    pending = rows.withColumn("shard", (F.lit(base) + F.pmod(F.col("uid"), F.lit(n_shards))).cast("int"))
    return pending, n_rows, base, n_shards


def write_plan(spark, lake, cfg: DownloadConfig, retry_failed: bool = False) -> dict:
    """Plan the next shards (new candidates or failed rows) into `download_plan`, one file per
    wave of consecutive shards; a no-op when there is nothing to download."""
    pending, n_rows, base, n_shards = plan_pending(spark, lake, cfg, retry_failed)
    info = {"planned_rows": n_rows, "first_shard": base, "planned_shards": 0}
    if n_rows == 0:
        return info
    from pyspark.sql import functions as F

    from laion_spark.spark import repartition_by_id
    from laion_spark.waves import task_slots, wave_size

    # One file per wave-sized run of consecutive shards (the wave size of today's cluster): a wave
    # reads the plan files whose shard range meets its own (one, or two if the cluster changed).
    chunk = wave_size(task_slots(spark), cfg.shards_per_slot, cfg.max_shards_per_wave)
    n_files = math.ceil(n_shards / chunk)
    per_wave = repartition_by_id(pending, n_files, ((F.col("shard") - F.lit(base)) / F.lit(chunk)).cast("int"))
    res = lake.overwrite(PLAN, per_wave.sortWithinPartitions("shard"), stage=STAGE,
                         metadata={"stage": STAGE, "first_shard": base, "shards": n_shards,
                                   "retry_failed": retry_failed})
    n_rows = info["planned_rows"] = res.rows
    info["planned_shards"] = n_shards
    log.info("download: planned %d rows in %d shards (ids %d..%d)%s", n_rows, n_shards, base,
             base + n_shards - 1, " (retry of failed rows)" if retry_failed else "")
    return info


def _unit_schema():
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("shard", T.IntegerType()), T.StructField("n_rows", T.LongType()),
        T.StructField("n_success", T.LongType()), T.StructField("n_failed", T.LongType()),
        T.StructField("n_skipped", T.LongType()), T.StructField("errors", T.StringType()),
        T.StructField("committed_at", T.TimestampType()),
    ])


def download_stage(spark, cfg: Config, lake, shards: list[int], errors: dict):
    """The WaveStage of download: units are plan shards, unit rows go to `download_units`."""
    from pyspark.sql import functions as F

    from laion_spark.spark import repartition_by_id
    from laion_spark.waves import WaveStage

    dcfg = cfg.download

    def rows(units):
        wave = [int(u) for u in units]
        plan = lake.read(PLAN, where_in={"shard": wave})
        df = repartition_by_id(plan, len(wave), _shard_partition(wave))
        return df.mapInArrow(_download_fn(dcfg), _images_spark_schema())

    def commit(lake, df, units, txn):
        wave = [int(u) for u in units]
        res = lake.append(IMAGES, df, stage=STAGE, txn=txn, compression=dcfg.compression,
                          metadata={"stage": STAGE, "shards": f"{wave[0]}..{wave[-1]}"})
        # Per-shard counts from the wave's own images files (two small columns, stats skipping).
        code = F.split("error", ":").getItem(0)
        got = (lake.read(IMAGES, where_in={"shard": wave}).groupBy("shard", "status", code.alias("code"))
               .count().collect())  # at most shards × (statuses + codes) rows: bounded by the wave
        per: dict = {}
        for r in got:
            u = per.setdefault(int(r["shard"]), {"n_rows": 0, "success": 0, "failed": 0,
                                                 "skipped": 0, "errors": {}})
            u["n_rows"] += r["count"]
            u[r["status"]] = u.get(r["status"], 0) + r["count"]
            if r["code"] is not None:
                u["errors"][r["code"]] = u["errors"].get(r["code"], 0) + r["count"]
                errors[r["code"]] = errors.get(r["code"], 0) + r["count"]
        now = dt.datetime.now(dt.timezone.utc)
        unit_rows = [(s, u["n_rows"], u["success"], u["failed"], u["skipped"],
                      json.dumps(u["errors"], sort_keys=True), now)
                     for s in wave for u in [per.get(s, {"n_rows": 0, "success": 0, "failed": 0,
                                                         "skipped": 0, "errors": {}})]]
        return (spark.createDataFrame(unit_rows, _unit_schema()),
                res.rows if res.version is not None else None)

    return WaveStage(name=STAGE, table=UNITS, unit_column="shard", units=lambda: [str(s) for s in shards],
                     rows=rows, commit=commit, units_per_slot=dcfg.shards_per_slot,
                     rows_column="n_rows", failed_column="n_failed",
                     sum_columns=("n_success", "n_skipped"))


def run_download(spark, cfg: Config, lake, *, max_waves: int | None = None) -> dict:
    """Download every candidate not in `images` yet (or, with retry_failed, the failed rows)."""
    from laion_spark.waves import run_waves

    dcfg = cfg.download
    started = time.time()
    if not lake.exists(CANDIDATES):
        raise RuntimeError(f"table '{CANDIDATES}' not found under {lake.root}: run `laion-spark extract` first")
    retry = bool(dcfg.retry_failed and lake.exists(IMAGES))
    summary: dict = {"mode": "retry_failed" if retry else "new", "planned_rows": 0}
    shards = _plan_shards(lake) if lake.exists(PLAN) else []
    done = lake.done_units(UNITS, "shard")
    if all(str(s) in done for s in shards) and not lake.open_waves(STAGE):
        info = write_plan(spark, lake, dcfg, retry)  # the last plan is done: plan what is new
        summary["planned_rows"] = info["planned_rows"]
        shards = _plan_shards(lake) if info["planned_shards"] else []
    errors: dict = {}
    stage = download_stage(spark, cfg, lake, shards, errors)
    w = run_waves(spark, lake, stage, max_units_per_wave=dcfg.max_shards_per_wave, max_waves=max_waves)
    elapsed = time.time() - started
    summary.update({
        "shards": len(shards), "committed_shards": w["units_done"], "skipped_shards": w["units_skipped"],
        "pending_shards": w["units_pending"], "waves": w["waves"], "wave_size": w["wave_size"],
        "pending_rows": w["rows"], "success": w["n_success"], "failed": w["failed"],
        "skipped": w["n_skipped"], "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "seconds": round(elapsed, 2), "rows_per_s": round(w["rows"] / max(elapsed, 1e-9), 1),
    })
    if retry:
        summary["retried_rows"] = w["rows"]
    return summary


# --------------------------------------------------------------------------- CLI and demo
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retry-failed", action="store_true",
                        help="download the failed rows of `images` again (new rows under new shards; "
                             "the newest row of a uid is its current one)")
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
