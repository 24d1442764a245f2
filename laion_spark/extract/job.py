"""`laion-spark extract`: WARC/WAT files → `candidates` (+ `failures`, `extract_files`).

Spark is only the distribution layer: the wave runner (`laion_spark/waves.py`) cuts the pending
files into waves of task slots × `extract.files_per_slot` files; each wave is one `mapInArrow`
pass over the plain `extract_file_batches` (one task per file), dedup, and its commits.

Commit order and crash safety, per wave: `candidates`, then `failures` (each carrying the wave's
Delta app id, so a replayed wave commits nothing twice), then `extract_files` LAST (the units
table: one row per file, the resume record). A crash loses at most the wave in flight; the next
run replays it first under the same wave id, so a wave whose rows were committed but whose file
rows were not adds no row twice.

Transient read errors (S3 503, connection reset, timeouts) are not failure rows: the task
re-reads the file (`extract.transient_retries`), then raises so Spark retries the task; on the
last attempt the file gets one `transient_io` failure row and no file row, so it stays pending.

Dedup: inside each task first (a set of uids), then `groupBy(uid)` + `min_by` over the wave
(partial aggregation map-side: a site-wide logo costs one row per task, not one per page). No
anti-join against the table: uids are uniform 64-bit hashes, so a wave's new uids meet every
bucket or uid range of `candidates` once waves are large, and any per-wave lookup reads a share
of the table that grows with it. So a wave reads nothing of `candidates` (counted in
tests/test_waves_dedup.py) and a uid may repeat across waves (a later crawl, a replayed file).
"One row per uid" is a rule of the readers: `lake.read_current("candidates")` (the same min_by
rule, the `current_candidates` SQL view), which download's plan uses once per run, and
`laion-spark maintain` rewrites the repeats away. `extract.dedup_against_table` turns the old
per-wave anti-join back on (cost: the table's uid column per wave).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from laion_spark.config import Config, ConfigError
from laion_spark.extract.extractor import (
    CANDIDATE_COLUMNS, FAILURE_COLUMNS, FILE_COLUMNS, KIND_CANDIDATE, KIND_FAILURE, KIND_FILE,
    OUTPUT_SCHEMA, extract_file_batches, open_input,
)
from laion_spark.extract.inputs import resolve_inputs

log = logging.getLogger(__name__)

STAGE = "extract"
CANDIDATES_TABLE = "candidates"
FAILURES_TABLE = "failures"
FILES_TABLE = "extract_files"
TRANSIENT_CODE = "transient_io"
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _spark_schema(arrow_schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema)


def is_transient(exc: BaseException) -> bool:
    """An I/O error worth retrying: connection reset/refused mid-read, timeouts, HTTP 5xx/429
    (S3 503 SlowDown included). Content errors (bad gzip, bad record) are not."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        name = type(exc).__name__
        if name in ("ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
                    "ServerTimeoutError", "ClientOSError", "ReadTimeoutError", "ConnectTimeoutError",
                    "EndpointConnectionError", "IncompleteRead"):
            return True
        text = str(exc)
        if any(k in text for k in ("503 Service Unavailable", "SlowDown", "Connection reset",
                                   "Server disconnected", ", message='Service Unavailable'")):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class _WatchedStream:
    """A file stream that remembers the first transient error its reads raised (the reader turns
    every error into a failure row; the job needs to know which ones were the network's)."""

    def __init__(self, raw, watch: "_Watch"):
        self._raw = raw
        self._watch = watch

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def _call(self, fn, *a):
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - recorded, then raised on to the reader
            self._watch.note(exc)
            raise

    def read(self, *a):
        return self._call(self._raw.read, *a)

    def readinto(self, b):
        return self._call(self._raw.readinto, b)

    def seek(self, *a):
        return self._call(self._raw.seek, *a)

    def tell(self):
        return self._raw.tell()

    def close(self):
        try:
            self._raw.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def __iter__(self):
        return iter(self._raw)


class _Watch:
    def __init__(self):
        self.transient: BaseException | None = None

    def note(self, exc: BaseException) -> None:
        if self.transient is None and is_transient(exc):
            self.transient = exc

    def open(self, path: str):
        try:
            return _WatchedStream(open_input(path), self)
        except Exception as exc:  # noqa: BLE001
            self.note(exc)
            raise


class TransientInputError(IOError):
    """A file's reads kept failing transiently: raised so Spark retries the task."""


def extract_file_retrying(path: str, ecfg, last_attempt: bool = True):
    """`extract_file_batches` of one file, buffered, re-read on a transient error. After the
    retries: raise TransientInputError (Spark retries the task) unless this is Spark's last
    attempt, which yields one `transient_io` failure row and no file row (the file stays pending).
    The buffer is one file's rows (its candidates), never more."""
    import datetime as dt

    import pyarrow as pa

    from laion_spark.extract.extractor import crawl_of

    delay = ecfg.transient_backoff_s
    for attempt in range(ecfg.transient_retries + 1):
        watch = _Watch()
        try:
            batches = list(extract_file_batches(path, ecfg, opener=watch.open))
        except Exception as exc:  # noqa: BLE001 - the core raises only for what it cannot row
            if not (watch.transient or is_transient(exc)):
                raise
            watch.transient = watch.transient or exc
            batches = []
        if watch.transient is None:
            yield from batches
            return
        err = watch.transient
        log.warning("%s: transient read error (attempt %d): %s: %s", path, attempt + 1,
                    type(err).__name__, err)
        del batches
        if attempt < ecfg.transient_retries:
            time.sleep(delay)
            delay *= 2
    if not last_attempt:
        raise TransientInputError(f"{path}: {type(err).__name__}: {err}") from err
    row = {f.name: None for f in OUTPUT_SCHEMA}
    row.update(kind=KIND_FAILURE, source_file=path, record_offset=-1,
               error=f"{TRANSIENT_CODE}: {type(err).__name__}: {err}"[:1000],
               crawl=crawl_of(path, ecfg.crawl), failed_at=dt.datetime.now(dt.timezone.utc))
    yield pa.RecordBatch.from_pylist([row], schema=OUTPUT_SCHEMA)


def _is_last_attempt() -> bool:
    """True when Spark will not retry this task again (local mode: always)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None:
            return True
        max_failures = int(ctx.getLocalProperty("laion.task.maxFailures") or 1)
        return ctx.attemptNumber() + 1 >= max_failures
    except Exception:  # noqa: BLE001
        return True


def _max_task_failures(spark) -> int:
    """spark.task.maxFailures (local[N] runs each task once unless local[N,F])."""
    import re

    master = spark.sparkContext.master
    m = re.match(r"local\[[^,\]]+,(\d+)\]", master)
    if master.startswith("local"):
        return int(m.group(1)) if m else 1
    return int(spark.sparkContext.getConf().get("spark.task.maxFailures", "4"))


def map_files(spark, files: list[str], ecfg):
    """The DataFrame of every row (kind = candidate | failure | file) of `files`, one task per
    file; candidate rows repeated inside a task (same uid) are dropped there, first one kept."""
    spark.sparkContext.setLocalProperty("laion.task.maxFailures", str(_max_task_failures(spark)))
    rdd = spark.sparkContext.parallelize([(f,) for f in files], max(1, len(files)))
    paths = spark.createDataFrame(rdd, "path string")

    def extract_partition(batches):
        import pyarrow as pa

        seen: set[int] = set()
        last = _is_last_attempt()
        for batch in batches:
            for path in batch.column(0).to_pylist():
                for out in extract_file_retrying(path, ecfg, last):
                    kinds = out.column("kind").to_pylist()
                    uids = out.column("uid").to_pylist()
                    keep = [k != KIND_CANDIDATE or (u not in seen and not seen.add(u))
                            for k, u in zip(kinds, uids)]
                    if not all(keep):
                        out = out.filter(pa.array(keep))
                    if out.num_rows:
                        yield out

    return paths.mapInArrow(extract_partition, _spark_schema(OUTPUT_SCHEMA))


def dedup_candidates(candidates, unique_key: list[str], existing_uids=None):
    """One row per uid: the row with the smallest order columns of `unique_key` ([key, *order],
    `lake.unique_keys["candidates"]`: source file, offset, url, page url, so a re-run picks the
    same row and the readers' `lake.read_current` agrees) via groupBy + min_by, minus the uids
    `existing_uids` holds (only with extract.dedup_against_table)."""
    from laion_spark.lake import one_row_per_key

    unique = one_row_per_key(candidates, unique_key[0], unique_key[1:])
    if existing_uids is not None:
        # Reads the table's uid column (one int64 column, not its rows) once per wave.
        unique = unique.join(existing_uids, "uid", "left_anti")
    return unique


def extract_stage(spark, cfg: Config, lake, files: list[str]):
    """The WaveStage of extract: units are input files, unit rows are `extract_files` rows."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from laion_spark.waves import WaveStage

    ecfg = cfg.extract
    file_schema = _spark_schema(OUTPUT_SCHEMA)
    file_schema = type(file_schema)([file_schema[c] for c in FILE_COLUMNS])

    def commit(lake, rows, units, txn):
        rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            file_rows = [r.asDict() for r in
                         rows.filter(F.col("kind") == KIND_FILE).select(*FILE_COLUMNS).collect()]
            for r in sorted(file_rows, key=lambda r: r["source_file"]):
                log.debug("extract %s: %d records, %d kept, %d failures (%.2fs)", r["source_file"],
                          r["n_records"], r["n_kept"], r["n_failures"], r["seconds"])
            candidates = rows.filter(F.col("kind") == KIND_CANDIDATE).select(*CANDIDATE_COLUMNS)
            existing = None
            if ecfg.dedup_against_table and lake.exists(CANDIDATES_TABLE):
                existing = lake.read(CANDIDATES_TABLE).select("uid")
            unique = dedup_candidates(candidates, lake.cfg.unique_keys[CANDIDATES_TABLE], existing)
            res = lake.append(CANDIDATES_TABLE, unique, stage=STAGE,
                              txn=txn, metadata={"stage": STAGE, "files": len(units)})
            failures = rows.filter(F.col("kind") == KIND_FAILURE).select(*FAILURE_COLUMNS)
            lake.append(FAILURES_TABLE, failures, stage=STAGE, txn=txn)
        finally:
            rows.unpersist()
        # One row per file of the wave (a handful): committed to extract_files by the runner.
        return (spark.createDataFrame(file_rows, file_schema),
                res.rows if res.version is not None else None)

    return WaveStage(
        name=STAGE, table=FILES_TABLE, unit_column="source_file", units=lambda: files,
        rows=lambda units: map_files(spark, units, ecfg), commit=commit,
        units_per_slot=ecfg.files_per_slot, rows_column="n_kept", failed_column="n_failures",
        sum_columns=("n_bytes", "n_records", "n_html_pages", "n_images", "n_with_alt"),
    )


def input_files(cfg: Config) -> list[str]:
    """The resolved inputs; ConfigError when there are none (or one named does not exist)."""
    files = resolve_inputs(cfg.extract)
    if not files:
        raise ConfigError("extract: no input files (set extract.inputs, or --input PATH|GLOB|URL|"
                          "*.paths.gz; a folder is searched for *.warc[.gz] and *.wat[.gz] files)")
    return files


def run_extract(spark, cfg: Config, lake, *, max_waves: int | None = None,
                files: list[str] | None = None) -> dict:
    """Extract every pending input file, wave by wave; return the run's counts and rates.
    `files`: the resolved inputs, when the caller resolved them (before starting Spark)."""
    from laion_spark.waves import run_waves

    ecfg = cfg.extract
    started = time.time()
    files = input_files(cfg) if files is None else files
    stage = extract_stage(spark, cfg, lake, files)
    w = run_waves(spark, lake, stage, max_units_per_wave=ecfg.max_files_per_wave, max_waves=max_waves)
    seconds = max(time.time() - started, 1e-9)
    summary = {
        "files": len(files), "files_skipped": w["units_skipped"], "files_extracted": w["units_done"],
        "files_pending": w["units_pending"], "files_retryable": w["units_retryable"],
        "waves": w["waves"], "wave_size": w["wave_size"],
        "records": w["n_records"], "html_pages": w["n_html_pages"], "images": w["n_images"],
        "images_with_alt": w["n_with_alt"], "candidates_kept": w["rows"],
        "candidates_written": w["committed_rows"],
        "duplicates_dropped": w["rows"] - w["committed_rows"], "failures": w["failed"],
        "bytes": w["n_bytes"], "seconds": round(seconds, 2),
        "records_per_s": round(w["n_records"] / seconds, 1),
        "pages_per_s": round(w["n_html_pages"] / seconds, 1),
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
    # Inputs first: a missing path or an empty folder is a config error, not a Spark start-up.
    files = input_files(ctx.cfg)
    return run_extract(ctx.spark, ctx.cfg, ctx.lake, files=files)


def prepare_demo(cfg: Config, web, out_dir) -> None:
    """Point extract at the demo web's WARC files."""
    cfg.extract.inputs = [str(p) for p in web.warc_paths]
    cfg.extract.input_format = "warc"
    if not cfg.extract.crawl:
        cfg.extract.crawl = "demo"
