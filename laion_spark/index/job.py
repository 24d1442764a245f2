"""`laion-spark index`: a Delta table (any version) → image and text faiss indices + metadata.

Spark does three things here and nothing else: count the rows that pass the filter, draw the
uniform random training/query sample, and run the add step (one partial index per id range,
via mapInArrow). Everything else is the Spark-free core (build.py, core.py, params.py).

Ids: the filtered rows ordered by (uid, url, text[, shard]); id = row number in that order.
Range partitioning keeps each task's rows a contiguous id range; a task adds them with local
ids 0..n-1 and the driver merges parts in order with the part's offset added, so the same
table version always gives the same metadata order, whatever the cluster.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
import uuid

import numpy as np

from laion_spark.config import Config
from laion_spark.index import build as builder
from laion_spark.index import core

log = logging.getLogger(__name__)

SORT_KEYS = ("uid", "url", "text", "shard")
METADATA_SOURCE = ("uid", "url", "text", "similarity", "punsafe", "pwatermark", "width", "height")


def output_dir(cfg: Config, version: int) -> str:
    return os.path.join(os.path.abspath(cfg.index.output), f"{cfg.index.table}-v{version}")


def _infer_dim_spark(df, column: str) -> int:
    from pyspark.sql import functions as F

    rows = (df.where(F.col(column).isNotNull()).select(F.length(column).alias("n"))
            .limit(1000).collect())
    if not rows:
        raise core.EmbeddingError(f"no non-null {column} among the filtered rows")
    values, counts = np.unique([r["n"] for r in rows], return_counts=True)
    return int(values[np.argmax(counts)] // 2)


def run_index(spark, cfg: Config, lake) -> dict:
    """Build `<index.output>/<table>-v<version>/` from the rows that pass `index.filter`."""
    from pyspark.sql import functions as F

    icfg = cfg.index
    started = time.time()
    table = icfg.table
    if not lake.exists(table):
        raise FileNotFoundError(f"table '{table}' not found under {lake.root}")
    version = icfg.table_version if icfg.table_version is not None else lake.version(table)
    df = lake.read(table, version)
    mods = list(icfg.modalities)
    for m in mods:
        if f"{m}_embedding" not in df.columns:
            raise ValueError(f"table '{table}' has no column {m}_embedding")
    base = df.where(F.expr(icfg.filter)) if icfg.filter.strip() else df
    dim = _infer_dim_spark(base, f"{mods[0]}_embedding")
    valid = " AND ".join(f"coalesce(length({m}_embedding) = {2 * dim}, false)" for m in mods)
    counts = base.select(F.count(F.lit(1)).alias("passing"),
                         F.sum(F.expr(f"CASE WHEN {valid} THEN 1 ELSE 0 END")).alias("kept")
                         ).first()
    n_passing, n = int(counts["passing"]), int(counts["kept"] or 0)
    dropped = n_passing - n
    if dropped:
        log.warning("%d rows pass the filter but lack a valid %d-d embedding: not indexed",
                    dropped, dim)
    kept = base.where(F.expr(valid))
    log.info("index %s v%s: %d rows pass '%s' (%d-d embeddings)", table, version, n,
             icfg.filter, dim)

    # Sample: uniform over the kept rows (Bernoulli in Spark, exact size on the driver).
    t0 = time.time()
    _, n_sample = builder.sample_sizes(n, dim, icfg)
    fraction = min(1.0, 1.15 * n_sample / n + 50.0 / n)
    sample = (kept.select("uid", *[f"{m}_embedding" for m in mods])
              .sample(withReplacement=False, fraction=fraction, seed=icfg.seed).toArrow())
    rng = np.random.default_rng(icfg.seed)
    if sample.num_rows > n_sample:
        sample = sample.take(np.sort(rng.choice(sample.num_rows, n_sample, replace=False)))
    vectors = {m: core.decode_embeddings(sample.column(f"{m}_embedding").combine_chunks(), dim)
               for m in mods}
    sample_s = time.time() - t0
    plan = builder.make_plan(n, dim, icfg, sample.column("uid").to_numpy(), vectors)
    plan.timings["sample_s"] = round(sample_s, 2)
    del sample, vectors

    final = output_dir(cfg, version)
    building = f"{final}.building-{uuid.uuid4().hex[:8]}"
    work = os.path.join(building, "_parts")
    os.makedirs(work, exist_ok=True)

    # Add: one task per contiguous id range.
    t0 = time.time()
    n_parts = max(1, math.ceil(n / max(1, icfg.rows_per_part)))
    keys = [k for k in SORT_KEYS if k in df.columns]
    cols = list(dict.fromkeys([*keys, *[c for c in METADATA_SOURCE if c in df.columns],
                               *[f"{m}_embedding" for m in mods]]))
    ordered = kept.select(*cols).repartitionByRange(n_parts, *keys).sortWithinPartitions(*keys)
    shipped = spark.sparkContext.broadcast((plan.trained, dim, plan.queries))
    parts_out = ordered.mapInArrow(_add_partition_fn(shipped, work),
                                   "part INT, rows BIGINT, folder STRING").collect()
    shipped.unpersist()
    plan.timings["add_s"] = round(time.time() - t0, 2)
    log.info("index add: %d rows in %d parts in %.1fs (%.0f rows/s, ground truth included)",
             n, len(parts_out), plan.timings["add_s"], n / max(plan.timings["add_s"], 1e-6))
    by_part = {r["part"]: r for r in parts_out}
    if len(by_part) != len(parts_out):
        raise RuntimeError("two tasks reported the same part id")
    parts = [{"rows": by_part[p]["rows"], "folder": by_part[p]["folder"]}
             for p in sorted(by_part)]
    if sum(p["rows"] for p in parts) != n:
        raise RuntimeError(f"the add step indexed {sum(p['rows'] for p in parts)} rows, "
                           f"expected {n}")
    summary = builder.finalize(building, plan, parts, icfg, {
        "table": table, "table_version": version, "filter": icfg.filter,
        "rows_passing_filter": n_passing, "rows_without_embedding": dropped,
        "id_order": keys, "parts": len(parts),
    })
    shutil.rmtree(work, ignore_errors=True)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(building, final)
    summary["output"] = final
    summary.update({"table": table, "table_version": version, "rows_passing_filter": n_passing,
                    "rows_without_embedding": dropped, "parts": len(parts),
                    "seconds": round(time.time() - started, 2)})
    return summary


def _add_partition_fn(shipped, work: str):
    """The executor side: add this partition's rows to copies of the trained indices."""

    def add_partition(batches):
        import pyarrow as pa
        from pyspark import TaskContext

        from laion_spark.index.core import PartBuilder

        trained, dim, queries = shipped.value
        pid = TaskContext.get().partitionId()
        part = PartBuilder(trained, dim, queries)
        for batch in batches:
            part.add_batch(batch)
        folder = os.path.join(work, f"part-{pid:05d}")
        tmp = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
        part.write(tmp)
        if os.path.exists(folder):  # a retried or speculative task: same rows, same content
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        yield pa.RecordBatch.from_pydict(
            {"part": [pid], "rows": [part.n], "folder": [folder]},
            schema=pa.schema([("part", pa.int32()), ("rows", pa.int64()),
                              ("folder", pa.string())]))

    return add_partition


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", default=None, help="table to index (default: pairs)")
    parser.add_argument("--version", type=int, default=None, help="table version (default: latest)")
    parser.add_argument("--filter", default=None,
                        help="SQL predicate of the rows to index (default: passes_filter; '' = all)")
    parser.add_argument("--output", default=None, help="folder of the indices")
    parser.add_argument("--memory-budget-gb", type=float, default=None,
                        help="bytes one index may take; decides the index type")
    parser.add_argument("--index-key", default=None, help="force a faiss index_factory string")
    parser.add_argument("--latency-target-ms", type=float, default=None,
                        help="single-query latency target that picks nprobe")
    parser.add_argument("--use-gpu", action="store_true", help="train k-means on the GPU")


def run(ctx, args: argparse.Namespace) -> dict:
    icfg = ctx.cfg.index
    for name, attr in (("table", "table"), ("version", "table_version"), ("filter", "filter"),
                       ("output", "output"), ("memory_budget_gb", "memory_budget_gb"),
                       ("index_key", "index_key"), ("latency_target_ms", "latency_target_ms")):
        value = getattr(args, name, None)
        if value is not None:
            setattr(icfg, attr, value)
    if getattr(args, "use_gpu", False):
        icfg.use_gpu = True
    return run_index(ctx.spark, ctx.cfg, ctx.lake)


def prepare_demo(cfg: Config, web, out_dir) -> None:
    """Indices of the demo go next to the demo web; the demo table is small: fewer queries."""
    cfg.index.output = str(os.path.join(str(out_dir), "indices"))
    cfg.index.recall_queries = min(cfg.index.recall_queries, 200)
