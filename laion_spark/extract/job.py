"""`laion-spark extract`: WARC/WAT files → `candidates` (+ `failures`, `extract_files`).

Spark is only the distribution layer: one partition per input file, `mapInArrow` over the plain
`extract_file_batches`, then dedup (within the run on uid, and an anti-join against what
`candidates` already holds) and three idempotent commits keyed by input file.

Commit order and crash safety: `candidates`, then `failures`, then `extract_files` LAST (it is the
resume record). A re-run works on the files not in `extract_files`; for each of the other two
tables it commits only the rows of files that table does not hold yet. So a crash between commits
re-extracts those files but never adds a row twice, and a crash before any commit leaves only
unreferenced Parquet files (the commit is atomic), never partial rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from laion_spark.config import Config
from laion_spark.extract.extractor import (
    CANDIDATE_COLUMNS, FAILURE_COLUMNS, FILE_COLUMNS, KIND_CANDIDATE, KIND_FAILURE, KIND_FILE,
    OUTPUT_SCHEMA, extract_file_batches,
)
from laion_spark.extract.inputs import resolve_inputs

log = logging.getLogger(__name__)

STAGE = "extract"
CANDIDATES_TABLE = "candidates"
FAILURES_TABLE = "failures"
FILES_TABLE = "extract_files"


def _spark_schema(arrow_schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema)


def map_files(spark, files: list[str], ecfg):
    """The DataFrame of every row (kind = candidate | failure | file) of `files`, one task per file."""
    rdd = spark.sparkContext.parallelize([(f,) for f in files], max(1, len(files)))
    paths = spark.createDataFrame(rdd, "path string")

    def extract_partition(batches):
        for batch in batches:
            for path in batch.column(0).to_pylist():
                yield from extract_file_batches(path, ecfg)

    return paths.mapInArrow(extract_partition, _spark_schema(OUTPUT_SCHEMA))


def dedup_candidates(candidates, existing_uids=None):
    """One row per uid (the first by source file and offset, so a re-run picks the same row),
    minus the uids `candidates` already holds."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("uid").orderBy("source_file", "record_offset", "url", "page_url")
    unique = (candidates.withColumn("_rank", F.row_number().over(order))
              .filter(F.col("_rank") == 1).drop("_rank"))
    if existing_uids is not None:
        unique = unique.join(existing_uids, on="uid", how="left_anti")
    return unique


def run_extract(spark, cfg: Config, lake) -> dict:
    """Extract every pending input file; return the run's counts and rates."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    ecfg = cfg.extract
    started = time.time()
    files = resolve_inputs(ecfg)
    if not files:
        raise ValueError("extract: no input files (set extract.inputs, or --input PATH|GLOB|URL|*.paths.gz)")
    pending = lake.pending_units(FILES_TABLE, STAGE, files)
    summary: dict = {"files": len(files), "files_skipped": len(files) - len(pending),
                     "files_extracted": len(pending)}
    if not pending:
        log.info("extract: all %d input files already committed, nothing to do", len(files))
        return summary | {"candidates_written": 0, "seconds": round(time.time() - started, 2)}
    log.info("extract: %d input files, %d already committed, %d to extract",
             len(files), len(files) - len(pending), len(pending))

    rows = map_files(spark, pending, ecfg).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        # The file rows come last in each task, so this action runs every task once (and caches).
        file_rows = rows.filter(F.col("kind") == KIND_FILE).select(*FILE_COLUMNS)
        per_file = [r.asDict() for r in file_rows.collect()]
        extract_seconds = time.time() - started
        for r in sorted(per_file, key=lambda r: r["source_file"]):
            log.info("extract %s: %d records, %d HTML pages, %d images, %d with alt, %d kept, "
                     "%d failures, drops %s (%.2fs)", r["source_file"], r["n_records"],
                     r["n_html_pages"], r["n_images"], r["n_with_alt"], r["n_kept"],
                     r["n_failures"], r["drops"], r["seconds"])
        totals = {k: sum(r[k] or 0 for r in per_file) for k in
                  ("n_bytes", "n_records", "n_html_pages", "n_images", "n_with_alt", "n_kept", "n_failures")}

        # candidates: only files this table does not hold yet (a crash may have left some in).
        cand_units = lake.pending_units(CANDIDATES_TABLE, STAGE, pending)
        written = 0
        if cand_units:
            candidates = rows.filter((F.col("kind") == KIND_CANDIDATE)
                                     & F.col("source_file").isin(cand_units)).select(*CANDIDATE_COLUMNS)
            existing = None
            if ecfg.dedup_against_table and lake.exists(CANDIDATES_TABLE):
                existing = lake.read(CANDIDATES_TABLE).select("uid")
            unique = dedup_candidates(candidates, existing)
            res = lake.append(CANDIDATES_TABLE, unique, stage=STAGE, units=cand_units,
                              metadata={"stage": STAGE, "files": len(cand_units)})
            written = res.rows

        fail_units = lake.pending_units(FAILURES_TABLE, STAGE, pending)
        if fail_units:
            failures = rows.filter((F.col("kind") == KIND_FAILURE)
                                   & F.col("source_file").isin(fail_units)).select(*FAILURE_COLUMNS)
            lake.append(FAILURES_TABLE, failures, stage=STAGE, units=fail_units)

        # Last: the resume record.
        lake.append(FILES_TABLE, file_rows, stage=STAGE, units=pending)
    finally:
        rows.unpersist()

    seconds = time.time() - started
    summary |= {
        "records": totals["n_records"], "html_pages": totals["n_html_pages"],
        "images": totals["n_images"], "images_with_alt": totals["n_with_alt"],
        "candidates_kept": totals["n_kept"], "candidates_written": written,
        "duplicates_dropped": totals["n_kept"] - written, "failures": totals["n_failures"],
        "bytes": totals["n_bytes"], "seconds": round(seconds, 2),
        "records_per_s": round(totals["n_records"] / max(extract_seconds, 1e-9), 1),
        "pages_per_s": round(totals["n_html_pages"] / max(extract_seconds, 1e-9), 1),
    }
    log.info("extract: %s", json.dumps(summary))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", dest="inputs", action="append", default=[],
                        metavar="PATH|GLOB|URL|LISTING",
                        help="input file, folder, glob, s3:// or https:// URL, or a Common Crawl "
                             "*.paths.gz listing (repeatable; adds to extract.inputs)")
    parser.add_argument("--format", dest="input_format", choices=["auto", "warc", "wat"], default=None)
    parser.add_argument("--sample", dest="sample_files", type=int, default=None,
                        help="extract a seeded random sample of N of the input files")
    parser.add_argument("--listing-prefix", default=None,
                        help="URL prefix of the paths in a listing (default https://data.commoncrawl.org/)")
    parser.add_argument("--crawl", default=None, help="crawl id to record (default: from the path)")
    parser.add_argument("--reader", dest="warc_reader", choices=["fastwarc", "warcio"], default=None)


def apply_arguments(cfg: Config, args: argparse.Namespace) -> None:
    e = cfg.extract
    if getattr(args, "inputs", None):
        e.inputs = list(e.inputs) + list(args.inputs)
    for name in ("input_format", "sample_files", "listing_prefix", "crawl", "warc_reader"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(e, name, value)


def run(ctx, args: argparse.Namespace) -> dict:
    apply_arguments(ctx.cfg, args)
    return run_extract(ctx.spark, ctx.cfg, ctx.lake)


def prepare_demo(cfg: Config, web, out_dir) -> None:
    """Point extract at the demo web's WARC files."""
    cfg.extract.inputs = [str(p) for p in web.warc_paths]
    cfg.extract.input_format = "warc"
    if not cfg.extract.crawl:
        cfg.extract.crawl = "demo"
