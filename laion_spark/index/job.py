"""`laion-spark index`: a Delta table (any version) → image and text faiss indices + metadata.

Spark does four things here, none of which brings more than the training sample to the
driver: (1) count kept rows per scan split and file (keys only: file path, row index, the
filter), (2) draw the uniform sample on the executors, which write it to the output, (3) run the
add step (mapInArrow: every task adds its rows with their global ids and writes its parts and
metadata slices straight to `index.output` through fsspec), (4) nothing else: the merge reads
the store (build.py `finalize`), here or on another machine with `--merge-only`.

Ids: rows in (file path, row index in the file) order, file = the table version's Parquet files;
id = number of kept rows before it in that order. Step (1) gives each split's kept count, so a
task knows the global offset of its rows without any shuffle or sort of the rows: the same
table version gives the same ids and metadata order whatever the cluster.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import uuid

import numpy as np

from laion_spark.config import Config
from laion_spark.index import build as builder
from laion_spark.index import core
from laion_spark.index.store import Store

log = logging.getLogger(__name__)

METADATA_SOURCE = ("uid", "url", "text", "similarity", "punsafe", "pwatermark", "width", "height",
                   "language", "language_group", "ptoxic")
FILE_COL, ROW_COL = "_index_file", "_index_row"
SAMPLE_SIGMAS = 4.0  # the sample fraction aims this many std-devs below the target size


def output_url(cfg: Config, lake_root: str) -> str:
    """`index.output` (folder or URL) or `<lake.root>/_indices` when empty."""
    out = cfg.index.output or f"{lake_root.rstrip('/')}/_indices"
    if "://" in out and not out.startswith("file://"):
        return out.rstrip("/")
    return os.path.abspath(out[len("file://"):] if out.startswith("file://") else out)


def output_dir(cfg: Config, version: int, lake_root: str = "./lake") -> str:
    base = output_url(cfg, lake_root)
    name = f"{cfg.index.table}-v{version}"
    return f"{base}/{name}" if "://" in base else os.path.join(base, name)


def _infer_dim_spark(df, column: str) -> int:
    from pyspark.sql import functions as F

    rows = (df.where(F.col(column).isNotNull()).select(F.length(column).alias("n"))
            .limit(1000).collect())
    if not rows:
        raise core.EmbeddingError(f"no non-null {column} among the filtered rows")
    values, counts = np.unique([r["n"] for r in rows], return_counts=True)
    return int(values[np.argmax(counts)] // 2)


def _segments(scan, valid: str) -> list[dict]:
    """Kept-row counts per (scan split, file): one small row per split, never the rows."""
    from pyspark.sql import functions as F

    ok = F.expr(valid)
    rows = (scan.select(F.spark_partition_id().alias("pid"), FILE_COL, ROW_COL, ok.alias("ok"))
            .groupBy("pid", FILE_COL)
            .agg(F.count(F.lit(1)).alias("passing"),
                 F.sum(F.col("ok").cast("long")).alias("kept"),
                 F.min(F.when(F.col("ok"), F.col(ROW_COL))).alias("first_row"))
            .collect())
    return [{"file": r[FILE_COL], "passing": int(r["passing"]), "kept": int(r["kept"] or 0),
             "first_row": r["first_row"]} for r in rows]


def assign_offsets(segments: list[dict]) -> dict[tuple[str, int], tuple[int, int]]:
    """(file, first kept row) → (first id, kept rows), in (file path, row) order."""
    out = {}
    next_id = 0
    for s in sorted((s for s in segments if s["kept"]), key=lambda s: (s["file"], s["first_row"])):
        key = (s["file"], int(s["first_row"]))
        if key in out:
            raise RuntimeError(f"two scan splits start at row {key[1]} of {key[0]}")
        out[key] = (next_id, s["kept"])
        next_id += s["kept"]
    return out


def _model_info(lake, table: str, df) -> dict:
    """The query encoders serve must load: pairs' clip_model / text_model columns (most common
    value) or, without them, the score commit's metadata."""
    from pyspark.sql import functions as F

    info: dict = {}
    for col, key in (("clip_model", "clip_model"), ("text_model", "text_model")):
        if col in df.columns:
            top = (df.where(F.col(col).isNotNull()).groupBy(col).count()
                   .orderBy(F.desc("count")).limit(1).collect())
            if top:
                info[key] = top[0][col]
    if len(info) < 2:
        try:
            for commit in lake.history(table):
                for key in ("clip_model", "text_model"):
                    if key not in info and commit.get(key):
                        info[key] = commit[key]
        except Exception as exc:  # history is a nicety here, not a requirement
            log.warning("could not read %s history for model names: %s", table, exc)
    if "clip_model" in info and "text_model" not in info:
        info["text_model"] = info["clip_model"]
    return info


def run_index(spark, cfg: Config, lake) -> dict:
    """Build `<index.output>/<table>-v<version>/` from the rows that pass `index.filter`."""
    from pyspark.sql import functions as F

    icfg = cfg.index
    started = time.time()
    table = icfg.table
    if not lake.exists(table):
        raise FileNotFoundError(f"table '{table}' not found under {lake.root}")
    version = icfg.table_version if icfg.table_version is not None else lake.version(table)
    # Plain Parquet read of the version's files on both backends: ids need _metadata.row_index,
    # which Delta's own reader (delta-spark) does not expose.
    df = lake.read(table, version, as_parquet=True)
    mods = list(icfg.modalities)
    for m in mods:
        if f"{m}_embedding" not in df.columns:
            raise ValueError(f"table '{table}' has no column {m}_embedding")
    scan = df.select("*", F.col("_metadata.file_path").alias(FILE_COL),
                     F.col("_metadata.row_index").alias(ROW_COL))
    base = scan.where(F.expr(icfg.filter)) if icfg.filter.strip() else scan
    dim = _infer_dim_spark(base, f"{mods[0]}_embedding")
    valid = " AND ".join(f"coalesce(length({m}_embedding) = {2 * dim}, false)" for m in mods)

    t0 = time.time()
    segments = _segments(base, valid)
    offsets = assign_offsets(segments)
    n_passing = sum(s["passing"] for s in segments)
    n = sum(v[1] for v in offsets.values())
    dropped = n_passing - n
    if dropped:
        log.warning("%d rows pass the filter but lack a valid %d-d embedding: not indexed",
                    dropped, dim)
    kept = base.where(F.expr(valid))
    log.info("index %s v%s: %d rows pass '%s' (%d-d embeddings) in %d files, %d splits",
             table, version, n, icfg.filter, dim, len({s["file"] for s in segments}),
             len(offsets))
    store = Store(output_dir(cfg, version, lake.root), icfg.storage_options)
    for stale in ("parts", "metadata", "build", "_sample"):
        store.rm(stale)
    store.makedirs()
    count_s = time.time() - t0

    # Sample: a hash of the row's keys and the seed, uniform in [0, 1); rows under a threshold
    # a few std-devs below the target are written by the executors; the driver reads at most
    # n_sample rows back. Deterministic for a table version and seed.
    t0 = time.time()
    _, n_sample = builder.sample_sizes(n, dim, icfg)
    target = min(n, n_sample)
    fraction = 1.0 if target >= n else max(
        0.0, (target - SAMPLE_SIGMAS * np.sqrt(target)) / n)
    u = (F.shiftrightunsigned(F.xxhash64(F.col(FILE_COL), F.col(ROW_COL), F.lit(icfg.seed)), 11)
         .cast("double") / float(1 << 53))
    written = (kept.where(u < fraction).select("uid", *[f"{m}_embedding" for m in mods])
               .mapInArrow(_write_sample_fn(store), "path STRING, rows BIGINT").collect())
    sample = _read_sample(store, sorted(r["path"] for r in written if r["rows"]), target)
    store.rm("_sample")
    sample_s = time.time() - t0
    plan = builder.make_plan(n, dim, icfg, sample.column("uid").to_numpy(),
                             {m: sample.column(f"{m}_embedding").combine_chunks() for m in mods})
    plan.timings.update({"count_s": round(count_s, 2), "sample_s": round(sample_s, 2),
                         "sample_rows": sample.num_rows})
    del sample
    extra = {"table": table, "table_version": version, "filter": icfg.filter,
             "rows_passing_filter": n_passing, "rows_without_embedding": dropped,
             "id_order": ["file path", "row index in file"]}
    builder.save_plan(store, plan, extra)
    model = _model_info(lake, table, df)
    store.write_json("model.json", {**model, "dim": dim})

    # Add: every task adds its rows with their global ids and writes its parts.
    t0 = time.time()
    cols = list(dict.fromkeys([*[c for c in METADATA_SOURCE if c in df.columns],
                               *[f"{m}_embedding" for m in mods], FILE_COL, ROW_COL]))
    shipped = spark.sparkContext.broadcast((plan.trained, dim, plan.queries, offsets))
    parts_out = kept.select(*cols).mapInArrow(
        _add_partition_fn(shipped, store, uuid.uuid4().hex),
        "first BIGINT, last BIGINT, rows BIGINT, name STRING").collect()
    shipped.unpersist()
    plan.timings["add_s"] = round(time.time() - t0, 2)
    log.info("index add: %d rows in %d parts in %.1fs (%.0f rows/s, ground truth included)",
             n, len(parts_out), plan.timings["add_s"], n / max(plan.timings["add_s"], 1e-6))
    parts = builder.save_parts(store, plan, extra, [r.asDict() for r in parts_out])
    summary: dict = {"output": store.url, "n_vectors": n, "parts": len(parts)}
    if icfg.merge_after_add:
        summary = builder.finalize(store, icfg)
    else:
        log.info("parts written; merge with: laion-spark index --merge-only --build %s",
                 store.url)
    summary.update({"output": store.url, "table": table, "table_version": version,
                    "rows_passing_filter": n_passing, "rows_without_embedding": dropped,
                    "parts": len(parts), "seconds": round(time.time() - started, 2)})
    return summary


def _write_sample_fn(store: Store):
    def write_sample(batches):
        import tempfile
        import uuid

        import pyarrow as pa
        from pyspark import TaskContext

        pid = TaskContext.get().partitionId()
        rows = 0
        fd, local = tempfile.mkstemp(suffix=".arrow")
        os.close(fd)
        writer = None
        with pa.OSFile(local, "wb") as sink:
            for batch in batches:
                if writer is None:
                    writer = pa.ipc.new_file(sink, batch.schema)
                writer.write_batch(batch)
                rows += batch.num_rows
            if writer is not None:
                writer.close()
        path = f"_sample/{pid:05d}-{uuid.uuid4().hex[:8]}.arrow"
        if rows:
            store.put(local, path)
        else:
            os.remove(local)
        yield pa.RecordBatch.from_pydict({"path": [path], "rows": [rows]},
                                         schema=pa.schema([("path", pa.string()),
                                                           ("rows", pa.int64())]))

    return write_sample


def _read_sample(store: Store, paths: list[str], limit: int):
    """The executors' sample files, at most `limit` rows (the driver never holds more)."""
    import pyarrow as pa

    tables, rows = [], 0
    for path in paths:
        with store.open(path) as f:
            t = pa.ipc.open_file(f).read_all()
        t = t.slice(0, max(0, limit - rows))
        tables.append(t)
        rows += t.num_rows
        if rows >= limit:
            break
    if not tables:
        raise core.EmbeddingError("the sample is empty: no rows to train on")
    return pa.concat_tables(tables).combine_chunks()


# One PartBuilder (the deserialised trained indices) per executor Python worker and build: a
# reused worker runs many add tasks one after another, and at LAION size each copy is the
# centroids (2^17 × d floats, 256 MB at 512-d) plus OPQ, so deserialising it per task costs time
# and allocator churn. One entry only: a new build replaces the last one's.
_BUILDER_CACHE: dict = {}


def _cached_builder(token: str, shipped):
    from laion_spark.index.core import PartBuilder

    if _BUILDER_CACHE.get("token") != token:
        _BUILDER_CACHE.clear()  # free the previous build's indices first
        trained, dim, queries, _ = shipped.value
        _BUILDER_CACHE.update(token=token, builder=PartBuilder(trained, dim, queries))
    return _BUILDER_CACHE["builder"]


def _add_partition_fn(shipped, store: Store, token: str):
    """The executor side: add rows with global ids; one part per contiguous id range.
    `token` names this build: tasks of one build in one Python worker share its PartBuilder."""

    def add_partition(batches):
        import pyarrow as pa
        import pyarrow.compute as pc

        offsets = shipped.value[3]
        part = _cached_builder(token, shipped)
        part.start(0)  # a task that failed in this worker may have left rows behind
        schema = pa.schema([("first", pa.int64()), ("last", pa.int64()), ("rows", pa.int64()),
                            ("name", pa.string())])
        current = None  # (file, expected rows)

        def finish():
            if current is None:
                return None
            if part.n != current[1]:
                raise RuntimeError(f"{current[0]}: {part.n} rows in this split, "
                                   f"the count step saw {current[1]}")
            m = part.write(store)  # local scratch: the executor's temp dir
            return pa.RecordBatch.from_pylist([{k: m[k] for k in schema.names}], schema=schema)

        for batch in batches:
            files = batch.column(FILE_COL)
            # runs of the same file inside the batch (a batch may span two files)
            change = np.flatnonzero(pc.not_equal(files.slice(1), files.slice(0, len(files) - 1))
                                    .to_numpy(zero_copy_only=False)) + 1 if len(files) > 1 \
                else np.array([], dtype=np.int64)
            bounds = [0, *change.tolist(), batch.num_rows]
            for a, b in zip(bounds[:-1], bounds[1:]):
                run = batch.slice(a, b - a)
                f = run.column(FILE_COL)[0].as_py()
                if current is None or current[0] != f:
                    out = finish()
                    if out is not None:
                        yield out
                    key = (f, int(run.column(ROW_COL)[0].as_py()))
                    if key not in offsets:
                        raise RuntimeError(f"split of {f} starting at row {key[1]} was not "
                                           f"seen by the count step (scan splits changed)")
                    first, rows = offsets[key]
                    part.start(first)
                    current = (f, rows)
                part.add_batch(run)
        out = finish()
        part.start(0)  # the cached builder keeps no rows between tasks
        if out is not None:
            yield out

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
    parser.add_argument("--merge", default=None, choices=builder.MERGE_MODES,
                        help="ondisk | memory | none (parts served as shards) | auto")
    parser.add_argument("--parts-only", action="store_true",
                        help="stop after the parts (merge later with --merge-only)")
    parser.add_argument("--merge-only", action="store_true",
                        help="merge the parts of a finished add step; needs no Spark")
    parser.add_argument("--build", default=None,
                        help="with --merge-only: the build folder/URL (<output>/<table>-v<N>)")


def run(ctx, args: argparse.Namespace) -> dict:
    icfg = ctx.cfg.index
    for name, attr in (("table", "table"), ("version", "table_version"), ("filter", "filter"),
                       ("output", "output"), ("memory_budget_gb", "memory_budget_gb"),
                       ("index_key", "index_key"), ("latency_target_ms", "latency_target_ms"),
                       ("merge", "merge")):
        value = getattr(args, name, None)
        if value is not None:
            setattr(icfg, attr, value)
    if getattr(args, "use_gpu", False):
        icfg.use_gpu = True
    if getattr(args, "parts_only", False):
        icfg.merge_after_add = False
    if getattr(args, "merge_only", False):
        return merge_only(ctx.cfg, getattr(args, "build", None))
    return run_index(ctx.spark, ctx.cfg, ctx.lake)


def merge_only(cfg: Config, build: str | None) -> dict:
    """The merge step alone, from the store (no Spark, no lake): a large-disk machine."""
    if not build:
        if cfg.index.table_version is None:
            raise ValueError("--merge-only needs --build <folder or URL> or --version N")
        build = output_dir(cfg, cfg.index.table_version, cfg.lake.root)
    return builder.finalize(Store(build, cfg.index.storage_options), cfg.index)


def prepare_demo(cfg: Config, web, out_dir) -> None:
    """Indices of the demo go next to the demo web; the demo table is small: fewer queries."""
    cfg.index.output = str(os.path.join(str(out_dir), "indices"))
    cfg.index.recall_queries = min(cfg.index.recall_queries, 200)
