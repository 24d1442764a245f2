"""`laion-spark maintain`: keep the lake's tables cheap to read as waves keep appending to them.

Each wave commits a few files per task, so after a crawl `candidates` holds thousands of small
files and every reader pays per-file costs (listing, footers, task launches). Per table, in this
order (all through lake.py, the only table layer):

0. a table with a unique key (`lake.unique_keys`: `candidates` by `uid`, which extract's waves
   may repeat) and repeated keys is rewritten with one row per key (the row
   `lake.read_current` picks), range-partitioned and sorted by the key into target-sized files,
   which stands in for step 1 this time. The table must not be appended to meanwhile: the
   rewrite is refused when it moved (delta-spark: checked just before its commit);
1. compact toward `lake.target_file_rows` rows per file (size = rows x the table's average row
   bytes, capped by `lake.max_file_bytes`), or z-order by `lake.cluster_columns[table]`
   (`candidates` by `uid`: files with narrow uid ranges, so uid filters skip files);
2. checkpoint (readers start from it instead of replaying every commit);
3. vacuum files that no version of the last `lake.vacuum_retention_hours` references (files a
   compaction replaced, a failed attempt's Parquet);
4. remove delta-rs staging folders (`part-*`) left empty or holding only a killed write's
   `_temporary` files, older than `lake.staging_grace_hours`.

Every step keeps the rows (step 0 drops only the repeats it counted): the row count from the log
is compared before and after, and a mismatch stops the run with the table named. Safe beside running jobs: compaction only replaces
files it read (appends commit on top), vacuum and the staging clean-up wait out their windows.
"""
from __future__ import annotations

import argparse
import logging
import time

from laion_spark.lake import LakeError

log = logging.getLogger(__name__)


def maintain_table(lake, name: str, *, vacuum_hours: float | None = None, grace_hours: float | None = None,
                   dry_run: bool = False) -> dict:
    """Compact/cluster, checkpoint, vacuum and clean staging for one table; returns what it did."""
    started = time.time()
    before = lake.table_summary(name)
    wanted = list(lake.cfg.cluster_columns.get(name, []))
    columns = set(lake.arrow_schema(name).names)
    cluster = [c for c in wanted if c in columns]
    if wanted and cluster != wanted:
        log.warning("maintain %s: cluster columns %s not in the table, skipped",
                    name, sorted(set(wanted) - columns))
    dedup = lake.dedup(name, dry_run=dry_run) if lake.unique_key(name) else None
    if dedup and dedup["files_added"]:
        compacted = {"target_bytes": lake.target_file_bytes(name), "small_files": before["files"]}
    else:
        compacted = lake.compact(name, cluster_columns=cluster or None, dry_run=dry_run)
    if not dry_run:
        lake.checkpoint(name)
    vacuumed = lake.vacuum(name, vacuum_hours, dry_run=dry_run)
    staging = lake.remove_staging(name, grace_hours, dry_run=dry_run)
    after = lake.table_summary(name)
    removed = dedup["duplicates"] if dedup and not dry_run else 0
    if after["rows"] != before["rows"] - removed:
        raise LakeError(f"maintain {name}: {before['rows']} rows before, {after['rows']} after "
                        f"({removed} repeated keys removed); stopped")
    summary = {
        "version_before": before["version"], "version_after": after["version"],
        "files_before": before["files"], "files_after": after["files"], "rows": after["rows"],
        "bytes_before": before["bytes"], "bytes_after": after["bytes"],
        "target_file_bytes": compacted["target_bytes"], "small_files": compacted["small_files"],
        "cluster_columns": cluster, "duplicates_removed": removed,
        "duplicates": dedup["duplicates"] if dedup else 0, "files_vacuumed": len(vacuumed), "staging_removed": len(staging),
        "dry_run": dry_run, "seconds": round(time.time() - started, 2),
    }
    log.info("maintain %s: %d -> %d files (%d rows, target %.1f MB%s), %s %d files, %d staging folders%s",
             name, before["files"], after["files"], after["rows"], compacted["target_bytes"] / 1e6,
             f", z-order {cluster}" if cluster else "", "would vacuum" if dry_run else "vacuumed",
             len(vacuumed), len(staging), " (dry run)" if dry_run else "")
    return summary


def run_maintain(spark, cfg, lake, tables: list[str] | None = None, vacuum_hours: float | None = None,
                 dry_run: bool = False) -> dict:
    """Maintain `tables` (default: every table under the lake root); returns a summary per table."""
    names = lake.tables()
    if tables:
        missing = [t for t in tables if t not in names]
        if missing:
            raise LakeError(f"maintain: no table {missing} under {lake.root} (tables: {names})")
        names = [n for n in names if n in tables]
    out = {}
    for name in names:
        out[name] = maintain_table(lake, name, vacuum_hours=vacuum_hours, dry_run=dry_run)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", action="append", default=None,
                        help="maintain only this table (repeatable; default: every table)")
    parser.add_argument("--vacuum-hours", type=float, default=None,
                        help="vacuum retention in hours (default lake.vacuum_retention_hours)")
    parser.add_argument("--dry-run", action="store_true", help="report what would be done, change nothing")


def run(ctx, args: argparse.Namespace) -> dict:
    return run_maintain(ctx.spark, ctx.cfg, ctx.lake, getattr(args, "table", None),
                        getattr(args, "vacuum_hours", None), getattr(args, "dry_run", False))
