"""`laion-spark score`: images -> pairs (CLIP embeddings, similarity, passes_filter, safety tags).

Spark is the thin layer here: the driver reads the model files once and broadcasts them, each
executor Python process builds the models once (`models.get_models`, cached across tasks), and
`mapInArrow` feeds `scorer.score_record_batches`. The unit of work is the images shard, taken from
`download_units` (read once; no scan of `images`); the wave runner (`laion_spark/waves.py`) scores
GPUs (cores on CPU) × `score.shards_per_slot` shards per wave, one commit per wave: `pairs` with
the wave's Delta app id, then `score_units` (one row per shard) last.

Each wave reads `images` filtered on the bare `shard` column in its own type (no cast), so Delta
file skipping and Parquet pushdown read only the wave's shard files (one file per shard).

Rows: only `status == 'success'` images are scored; failed/skipped downloads stay in `images`
only, so `pairs` is exactly what was scored. A success row whose bytes do not decode is kept with
`score_error` set, null image columns and `passes_filter = false`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import time

log = logging.getLogger(__name__)

STAGE = "score"
INPUT_TABLE = "images"
OUTPUT_TABLE = "pairs"
UNITS = "score_units"
DOWNLOAD_UNITS = "download_units"


def _spark_schema(arrow_schema):
    from laion_spark.spark import from_arrow_schema

    return from_arrow_schema(arrow_schema)


def _arrow_schema(spark_schema):
    from laion_spark.spark import to_arrow_schema  # Spark 3.5 and 4.x differ here

    return to_arrow_schema(spark_schema)


def make_partition_scorer(key: str, bundle_broadcast, score_cfg):
    """The mapInArrow function: small closure (a key, the broadcast handle, settings)."""
    from laion_spark.score.scorer import ScoreSettings

    settings = ScoreSettings.from_config(score_cfg)
    settings.prefetch_batches = score_cfg.prefetch_batches
    device, dtype, load_log_dir = score_cfg.device, score_cfg.dtype, score_cfg.load_log_dir

    def score_partition(batches):
        import torch

        from laion_spark.score.models import get_models
        from laion_spark.score.scorer import score_record_batches

        models = get_models(key, lambda: bundle_broadcast.value, device, dtype, load_log_dir)
        if models.device.type == "cpu":
            try:
                from pyspark import TaskContext

                torch.set_num_threads(max(1, int(TaskContext.get().cpus())))
            except Exception:
                pass
        yield from score_record_batches(batches, models, settings)

    return score_partition


def scored_shards(spark, lake) -> list[str]:
    """The images shards to score: `download_units` rows with a success (read once, one column
    pair). A lake without `download_units` (written by hand or an older version) falls back to
    the distinct shards of `images` (one Spark job over one column)."""
    from pyspark.sql import functions as F

    if lake.exists(DOWNLOAD_UNITS):
        t = lake.read_arrow(DOWNLOAD_UNITS, columns=["shard", "n_success"]).to_pylist()
        return sorted({str(r["shard"]) for r in t if (r["n_success"] or 0) > 0}, key=_shard_key)
    log.warning("score: no '%s' table: listing the shards of '%s' instead", DOWNLOAD_UNITS, INPUT_TABLE)
    rows = lake.read(INPUT_TABLE).filter(F.col("status") == "success").select("shard").distinct().collect()
    return sorted((str(r[0]) for r in rows if r[0] is not None), key=_shard_key)


def _shard_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _slots(cfg):
    """Score's slots: the GPUs when scoring on CUDA, else the cluster's task slots."""
    def slots(spark) -> int:
        from laion_spark.waves import task_slots

        if cfg.device in ("cuda", "auto"):
            conf = spark.sparkContext.getConf()
            per_exec = conf.get("spark.executor.resource.gpu.amount", None)
            if per_exec:
                execs = int(conf.get("spark.executor.instances", "1"))
                per_task = float(conf.get("spark.task.resource.gpu.amount", "1"))
                return max(1, int(execs * float(per_exec) / per_task))
            if cfg.device == "cuda":
                try:
                    import torch

                    return max(1, torch.cuda.device_count())
                except Exception:  # noqa: BLE001
                    return 1
        return task_slots(spark)

    return slots


def _unit_schema(shard_type):
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("shard", shard_type), T.StructField("n_rows", T.LongType()),
        T.StructField("n_passes", T.LongType()), T.StructField("n_errors", T.LongType()),
        T.StructField("committed_at", T.TimestampType()),
    ])


def score_stage(spark, cfg, lake, shards: list[str], score_partition, out_schema):
    """The WaveStage of score: units are images shards, unit rows go to `score_units`."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from laion_spark.waves import WaveStage

    from laion_spark.lake import _spark_schema_from_arrow

    sc = cfg.score
    shard_field = _spark_schema_from_arrow(lake.arrow_schema(INPUT_TABLE))["shard"]
    is_int = isinstance(shard_field.dataType, (T.IntegerType, T.LongType, T.ShortType))

    def typed(units):
        return [int(u) for u in units] if is_int else list(units)

    def rows(units):
        # The bare column in its own type: Delta skipping + Parquet pushdown read only these files.
        df = lake.read(INPUT_TABLE, where_in={"shard": typed(units)}).filter(F.col("status") == "success")
        if sc.partitions:
            df = df.repartition(sc.partitions)
        return df.mapInArrow(score_partition, out_schema)

    def commit(lake, df, units, txn):
        res = lake.append(OUTPUT_TABLE, df, stage=STAGE, txn=txn,
                          metadata={"clip_model": sc.clip_model,
                                    "text_model": sc.multilingual_text_model or sc.clip_model})
        got = {r["shard"]: r for r in
               lake.read(OUTPUT_TABLE, where_in={"shard": typed(units)}).groupBy("shard").agg(
                   F.count(F.lit(1)).alias("n"), F.sum(F.col("passes_filter").cast("long")).alias("p"),
                   F.sum(F.col("score_error").isNotNull().cast("long")).alias("e")).collect()}
        now = dt.datetime.now(dt.timezone.utc)
        unit_rows = [(u, int(got[u]["n"]) if u in got else 0, int(got[u]["p"] or 0) if u in got else 0,
                      int(got[u]["e"] or 0) if u in got else 0, now) for u in typed(units)]
        return (spark.createDataFrame(unit_rows, _unit_schema(shard_field.dataType)),
                res.rows if res.version is not None else None)

    return WaveStage(name=STAGE, table=UNITS, unit_column="shard", units=lambda: shards, rows=rows,
                     commit=commit, units_per_slot=sc.shards_per_slot, rows_column="n_rows",
                     failed_column="n_errors", sum_columns=("n_passes",), slots=_slots(sc))


def run_score(spark, cfg, lake, *, max_waves: int | None = None) -> dict:
    """Score every images shard not yet in `score_units`, wave by wave; returns counts and rates."""
    from laion_spark.lake import _spark_schema_from_arrow
    from laion_spark.score.models import bundle_from_config
    from laion_spark.score.scorer import pairs_schema
    from laion_spark.waves import run_waves

    sc = cfg.score
    started = time.time()
    if not lake.exists(INPUT_TABLE):
        raise FileNotFoundError(f"table '{INPUT_TABLE}' not found under {lake.root}: run download first")
    shards = scored_shards(spark, lake)
    done = lake.done_units(UNITS, "shard")
    summary = {"shards": len(shards), "shards_skipped": sum(s in done for s in shards), "shards_scored": 0,
               "rows": 0, "passes_filter": 0, "score_errors": 0}
    if all(s in done for s in shards) and not lake.open_waves(STAGE):
        log.info("score: all %d shards already in %s", len(shards), UNITS)
        return summary
    images_schema = _spark_schema_from_arrow(lake.arrow_schema(INPUT_TABLE))  # no listing job
    bundle = bundle_from_config(sc)
    key = bundle.key
    broadcast = spark.sparkContext.broadcast(bundle)
    del bundle
    out_schema = _spark_schema(pairs_schema(_arrow_schema(images_schema)))
    stage = score_stage(spark, cfg, lake, shards, make_partition_scorer(key, broadcast, sc), out_schema)
    try:
        w = run_waves(spark, lake, stage, max_units_per_wave=sc.max_shards_per_wave, max_waves=max_waves)
    finally:
        broadcast.destroy()
    elapsed = time.time() - started
    summary.update({"shards_scored": w["units_done"], "rows": w["rows"], "passes_filter": w["n_passes"],
                    "score_errors": w["failed"], "waves": w["waves"], "wave_size": w["wave_size"],
                    "seconds": round(elapsed, 1),
                    "rows_per_s": round(w["rows"] / elapsed, 1) if elapsed else None})
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-model", default=None, help="Hub name or local folder (score.clip_model)")
    parser.add_argument("--multilingual-text-model", default=None,
                        help="M-CLIP-style text encoder for multi/nolang captions")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])


def run(ctx, args: argparse.Namespace) -> dict:
    sc = ctx.cfg.score
    for arg, attr in (("clip_model", "clip_model"), ("multilingual_text_model", "multilingual_text_model"),
                      ("batch_size", "batch_size"), ("device", "device"), ("dtype", "dtype")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(sc, attr, value)
    return run_score(ctx.spark, ctx.cfg, ctx.lake)


def prepare_demo(cfg, web, out_dir) -> None:
    """Train (or reuse) the demo CLIP under <out_dir>/demo-clip and point the config at it."""
    from laion_spark.score.demo_model import train_demo_clip

    model_dir = cfg.demo.clip_model_dir or os.path.join(str(out_dir), "demo-clip")
    result = train_demo_clip(model_dir, seed=cfg.demo.seed)
    cfg.score.clip_model = result.clip_path
    cfg.score.multilingual_text_model = result.multilingual_path
