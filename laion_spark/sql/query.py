"""`laion-spark sql "SELECT ..."`: every table of the lake is a view by its name; the result is
shown or written (Parquet, Delta, CSV). This is how users cut subsets."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

FORMATS = ("parquet", "delta", "csv", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="Spark SQL; tables are views by their names")
    parser.add_argument("--out", default=None,
                        help="write the result here (for --format delta: a table name in the lake, "
                             "or a path)")
    parser.add_argument("--format", default="parquet", choices=FORMATS)
    parser.add_argument("--show", type=int, default=20, help="rows to print when not writing")


def run_sql(ctx, query: str, out: str | None = None, fmt: str = "parquet", show: int = 20) -> dict:
    names = ctx.lake.register_views()
    log.info("views: %s", ", ".join(names) or "(no tables under %s)" % ctx.lake.root)
    df = ctx.spark.sql(query)
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
