"""`laion-spark demo`: serve the generated demo web on 127.0.0.1 and run every stage on it.

Each pipeline stage module (`laion_spark/<stage>/job.py`) exposes `run_<stage>(spark, cfg, lake)`
and may expose `prepare_demo(cfg, web, out_dir)` to point its config at the demo (the WARC
paths, loopback allowed for the downloader, the demo CLIP model). Stages not built yet are
reported and skipped, so the demo grows with the suite.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

PIPELINE = [
    ("extract", "laion_spark.extract.job", "run_extract"),
    ("download", "laion_spark.download.job", "run_download"),
    ("score", "laion_spark.score.job", "run_score"),
    ("index", "laion_spark.index.job", "run_index"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default=None, help="where the demo web is written")
    parser.add_argument("--pages", type=int, default=None, help="number of demo pages")
    parser.add_argument("--stages", default=None,
                        help="comma-separated subset of: " + ",".join(s for s, _, _ in PIPELINE))
    parser.add_argument("--serve", action="store_true",
                        help="after the run, keep the search service up on the demo index")


def _import_stage(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def run_demo(ctx, out_dir: str | None = None, n_pages: int | None = None,
             stages: list[str] | None = None) -> dict:
    from laion_spark.demo.web import serve_demo_web

    cfg = ctx.cfg
    out = Path(out_dir or cfg.demo.out_dir).resolve()
    pages = n_pages or cfg.demo.n_pages
    results: dict = {}
    with serve_demo_web(out, seed=cfg.demo.seed, n_pages=pages) as (server, web):
        log.info("demo web: %d WARC files, served at %s", len(web.warc_paths), server.base_url)
        results["demo_web"] = {"warc_files": len(web.warc_paths), "base_url": server.base_url}
        for stage, module_name, fn_name in PIPELINE:
            if stages and stage not in stages:
                continue
            module = _import_stage(module_name)
            if module is None or not hasattr(module, fn_name):
                log.warning("stage %s: not built yet, skipped", stage)
                results[stage] = "not built yet"
                continue
            if hasattr(module, "prepare_demo"):
                module.prepare_demo(cfg, web, out)
            started = time.time()
            summary = getattr(module, fn_name)(ctx.spark, cfg, ctx.lake)
            log.info("stage %s done in %.1fs: %s", stage, time.time() - started, summary)
            results[stage] = summary
        if not stages or "maintain" in stages:  # compact, checkpoint, vacuum: what a cron would do
            from laion_spark.maintain import run_maintain

            results["maintain"] = run_maintain(ctx.spark, cfg, ctx.lake)
    print_lake_summary(ctx)
    return results


def print_lake_summary(ctx) -> None:
    """What the run produced: each table, its version and row count."""
    lake = ctx.lake
    names = lake.tables()
    print(f"\nlake {lake.root} ({lake.backend}):")
    for name in names:
        n = lake.read(name).count()
        print(f"  {name:<20} version {lake.version(name):>3}  {n:>8} rows")
    if not names:
        print("  (no tables)")


def run(ctx, args: argparse.Namespace) -> dict:
    stages = args.stages.split(",") if args.stages else None
    results = run_demo(ctx, args.out_dir, args.pages, stages)
    command = serve_command(ctx, results)
    if command:
        print("\nexplore the demo index:\n  " + " ".join(command) +
              f"\n  then open http://{ctx.cfg.serve.host}:{ctx.cfg.serve.port}/")
        if getattr(args, "serve", False):
            from laion_spark.serve.job import build_spec, parse_index_args, serve

            spec = build_spec(ctx.cfg, parse_index_args([f"demo={results['index']['output']}"]),
                              ctx.cfg.score.clip_model, ctx.cfg.score.multilingual_text_model,
                              ctx.lake.root)
            serve(spec, ctx.cfg.serve.host, ctx.cfg.serve.port, ctx.cfg.serve.workers)
    return results


def serve_command(ctx, results: dict) -> list[str] | None:
    """`laion-spark serve` over the demo's index, thumbnails from its lake, its CLIP models."""
    index = results.get("index")
    if not isinstance(index, dict) or not index.get("output"):
        return None
    cmd = ["laion-spark", "serve", "--index", f"demo={index['output']}",
           "--images-lake", str(ctx.lake.root)]
    if ctx.cfg.score.clip_model:
        cmd += ["--clip-model", str(ctx.cfg.score.clip_model)]
    if ctx.cfg.score.multilingual_text_model:
        cmd += ["--text-model", str(ctx.cfg.score.multilingual_text_model)]
    return cmd
