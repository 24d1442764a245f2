"""`laion-spark sql "SELECT ..."`: every table of the lake is a view by its name; the result is
shown or written (Parquet, Delta, CSV). This is how users cut subsets."""
from __future__ import annotations

import argparse
import logging
import re

log = logging.getLogger(__name__)

FORMATS = ("parquet", "delta", "csv", "json")
# What Spark itself leaves in an output folder: parts, their checksums, the commit markers.
SPARK_OUTPUT = re.compile(r"^(\.?part-.*|\.?_SUCCESS(\.crc)?|_temporary|_(committed|started)_.*)$")


def check_out(out: str, fmt: str) -> None:
    """Refuse an --out whose overwrite would delete what this command did not write: Spark's
    overwrite mode deletes the whole path first (a folder's own files, a file, the lake itself
    given its root, a table being read). Allowed: a new path, an empty folder, an earlier
    output (Spark's parts and markers only; for delta, a Delta table)."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(out)
        if not fs.exists(path):
            return
        is_dir = fs.isdir(path)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] \
            if is_dir else []
    except (ImportError, ValueError, OSError) as exc:  # no driver for the scheme: Spark decides
        log.warning("sql: cannot check --out %s before writing: %s", out, exc)
        return
    if not is_dir:
        raise SystemExit(f"sql: --out {out} is a file; writing would replace it: choose a new "
                         "path")
    if fmt == "delta":
        other = [] if "_delta_log" in names else names
    else:
        other = sorted(n for n in names if not SPARK_OUTPUT.match(n))
    if other:
        raise SystemExit(f"sql: --out {out} holds {len(other)} entries that are not an earlier "
                         f"output of this command ({', '.join(other[:5])}): writing would "
                         "delete them; choose a new or empty folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="Spark SQL; tables are views by their names")
    parser.add_argument("--out", default=None,
                        help="write the result here (for --format delta: a table name in the lake, "
                             "or a path)")
    parser.add_argument("--format", default="parquet", choices=FORMATS)
    parser.add_argument("--show", type=int, default=20, help="rows to print when not writing")


def run_sql(ctx, query: str, out: str | None = None, fmt: str = "parquet", show: int = 20) -> dict:
    from pyspark.errors import AnalysisException

    if out is not None and (fmt != "delta" or "/" in out or out.startswith(".")):
        check_out(out, fmt)
    names = ctx.lake.register_views()
    log.info("views: %s", ", ".join(names) or "(no tables under %s)" % ctx.lake.root)
    try:
        df = ctx.spark.sql(query)
    except AnalysisException as exc:  # ParseException too: the reason, not the Java stack
        raise SystemExit(f"sql: {str(exc).strip().splitlines()[0]}") from None
    if out is None:
        rows = df.limit(show).collect()
        cols = df.columns
        print("\t".join(cols))
        for r in rows:
            print("\t".join("" if v is None else (f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray))
                                                  else str(v)) for v in r))
        return {"shown": len(rows), "columns": cols}
    if fmt == "delta":
        from laion_spark.lake import Lake
        from laion_spark.config import LakeConfig

        if "/" in out or out.startswith("."):
            # A path: its parent is a lake root, its last part the table name.
            import os

            root, name = os.path.split(out.rstrip("/"))
            lake = Lake(ctx.spark, LakeConfig(root=root or ".", backend=ctx.cfg.lake.backend,
                                              storage_options=ctx.cfg.lake.storage_options))
        else:
            lake, name = ctx.lake, out
        res = lake.overwrite(name, df, stage="sql", metadata={"query": query})
        return {"table": lake.table_path(name), "version": res.version, "rows": res.rows}
    writer = df.write.mode("overwrite")
    if fmt == "csv":
        writer = writer.option("header", "true")
    getattr(writer, fmt)(out)
    count = ctx.spark.read.format(fmt).option("header", "true").load(out).count()
    return {"out": out, "format": fmt, "rows": count}


def run(ctx, args: argparse.Namespace) -> dict:
    return run_sql(ctx, args.query, args.out, args.format, args.show)
