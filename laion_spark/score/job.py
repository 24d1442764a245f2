"""`laion-spark score`: images -> pairs (CLIP embeddings, similarity, passes_filter, safety tags).

Spark is the thin layer here: the driver reads the model files once and broadcasts them, each
executor Python process builds the models once (`models.get_models`, cached across tasks), and
`mapInArrow` feeds `scorer.score_record_batches`. The unit of work is the images shard: shards
already in `pairs` are skipped, each group of shards is one idempotent Delta commit.

Rows: only `status == 'success'` images are scored; failed/skipped downloads stay in `images`
only, so `pairs` is exactly what was scored. A success row whose bytes do not decode is kept with
`score_error` set, null image columns and `passes_filter = false`.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

log = logging.getLogger(__name__)

STAGE = "score"
INPUT_TABLE = "images"
OUTPUT_TABLE = "pairs"


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


def run_score(spark, cfg, lake) -> dict:
    """Score every images shard not yet in pairs; returns counts and rates."""
    from pyspark.sql import functions as F

    from laion_spark.score.models import bundle_from_config
    from laion_spark.score.scorer import pairs_schema

    sc = cfg.score
    started = time.time()
    if not lake.exists(INPUT_TABLE):
        raise FileNotFoundError(f"table '{INPUT_TABLE}' not found under {lake.root}: run download first")
    images = lake.read(INPUT_TABLE)
    shards = sorted(str(r[0]) for r in images.select(F.col("shard").cast("string")).distinct().collect()
                    if r[0] is not None)
    pending = lake.pending_units(OUTPUT_TABLE, STAGE, shards)
    summary = {"shards": len(shards), "shards_skipped": len(shards) - len(pending), "shards_scored": 0,
               "rows": 0, "passes_filter": 0, "score_errors": 0}
    if not pending:
        log.info("score: all %d shards already in %s", len(shards), OUTPUT_TABLE)
        return summary
    bundle = bundle_from_config(sc)
    key = bundle.key
    broadcast = spark.sparkContext.broadcast(bundle)
    del bundle
    out_schema = _spark_schema(pairs_schema(_arrow_schema(images.schema)))
    score_partition = make_partition_scorer(key, broadcast, sc)
    step = max(1, sc.shards_per_commit)
    try:
        for start in range(0, len(pending), step):
            group = pending[start:start + step]
            df = images.filter(F.col("shard").cast("string").isin(group)).filter(F.col("status") == "success")
            if sc.partitions:
                df = df.repartition(sc.partitions)
            scored = df.mapInArrow(score_partition, out_schema)
            result = lake.append(OUTPUT_TABLE, scored, stage=STAGE, units=group,
                                 metadata={"clip_model": sc.clip_model,
                                           "text_model": sc.multilingual_text_model or sc.clip_model})
            summary["shards_scored"] += len(group)
            summary["rows"] += result.rows
            log.info("score: shards %d-%d of %d committed (%d rows)", start + 1, start + len(group),
                     len(pending), result.rows)
    finally:
        broadcast.destroy()
    counts = (lake.read(OUTPUT_TABLE).filter(F.col("shard").cast("string").isin(pending))
              .agg(F.sum(F.col("passes_filter").cast("int")).alias("p"),
                   F.sum(F.col("score_error").isNotNull().cast("int")).alias("e")).collect()[0])
    summary["passes_filter"] = int(counts["p"] or 0)
    summary["score_errors"] = int(counts["e"] or 0)
    elapsed = time.time() - started
    summary["seconds"] = round(elapsed, 1)
    summary["rows_per_s"] = round(summary["rows"] / elapsed, 1) if elapsed else None
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
