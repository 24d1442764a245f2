"""`laion-spark serve --index DIR [--index NAME=DIR ...]`: the search service on uvicorn with
several worker processes, no Spark. Every worker opens the same memory-mapped files, so N
workers share one copy of the index and metadata in the page cache.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from laion_spark.serve.spec import SPEC_ENV, ServeSpec

log = logging.getLogger(__name__)


def parse_index_args(values: list[str]) -> list[tuple[str, str]]:
    """`DIR` (named after the folder) or `NAME=DIR`; names must be unique."""
    out: list[tuple[str, str]] = []
    for v in values:
        if "=" in v and not os.path.exists(v):
            name, path = v.split("=", 1)
        else:
            path = v
            name = os.path.basename(os.path.normpath(v))
        if not name or not path:
            raise ValueError(f"--index {v!r}: expected DIR or NAME=DIR")
        if name in {n for n, _ in out}:
            raise ValueError(f"--index: the name {name!r} is used twice")
        out.append((name, os.path.abspath(path)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", action="append", default=[], metavar="[NAME=]DIR",
                        help="an index folder written by `laion-spark index` (repeatable)")
    parser.add_argument("--host", default=None, help="bind address (serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="serve.port (1234)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (serve.workers)")
    parser.add_argument("--clip-model", default=None,
                        help="CLIP folder or name, when the index folder has no model.json")
    parser.add_argument("--text-model", default=None,
                        help="M-CLIP folder or name for use_mclip, when no model.json")
    parser.add_argument("--images-lake", default=None,
                        help="lake root whose `images` table serves result thumbnails by uid "
                             "(default: the lake named by the index folder, else none)")
    parser.add_argument("--allow-loopback-urls", action="store_true",
                        help="let image_url queries reach 127.0.0.1 (the demo web; never in "
                             "production)")


def build_spec(cfg, indices: list[tuple[str, str]], clip_model: Optional[str] = None,
               text_model: Optional[str] = None, lake_root: Optional[str] = None,
               allow_loopback: bool = False) -> ServeSpec:
    download = cfg.download
    if allow_loopback:
        from dataclasses import replace

        download = replace(download, allow_loopback=True)
    return ServeSpec(indices=indices, serve=cfg.serve, download=download,
                     clip_model=clip_model, text_model=text_model, lake_root=lake_root)


def serve(spec: ServeSpec, host: str, port: int, workers: int) -> None:
    """Run uvicorn in this process until interrupted (workers > 1: a supervisor and children;
    the app, with faiss, torch and FastAPI, is imported by the workers only)."""
    import uvicorn

    from laion_spark.serve.protocol import UVICORN_HTTP

    os.environ[SPEC_ENV] = spec.to_json()
    if workers <= 1:
        from laion_spark.serve.app import create_app

        uvicorn.run(create_app(spec), host=host, port=port, log_level="warning",
                    access_log=False, timeout_graceful_shutdown=5, http=UVICORN_HTTP)
    else:
        uvicorn.run("laion_spark.serve.app:create_app_from_env", factory=True, host=host,
                    port=port, workers=workers, log_level="warning",
                    access_log=False, timeout_graceful_shutdown=5, http=UVICORN_HTTP)


def run(ctx, args: argparse.Namespace) -> dict:
    if not args.index:
        raise SystemExit("serve: give at least one --index DIR")
    cfg = ctx.cfg
    host = args.host or cfg.serve.host
    port = args.port or cfg.serve.port
    workers = args.workers or cfg.serve.workers
    spec = build_spec(cfg, parse_index_args(args.index), args.clip_model, args.text_model,
                      args.images_lake or getattr(args, "lake", None),
                      args.allow_loopback_urls)
    log.info("serve: http://%s:%d/ (%d workers) over %s", host, port, workers,
             ", ".join(f"{n}={p}" for n, p in spec.indices))
    serve(spec, host, port, workers)
    return {"served": [n for n, _ in spec.indices], "host": host, "port": port}
