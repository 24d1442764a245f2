"""The shared base of every command: parse `--config/--set`, build the session and the lake once,
run one stage, log its summary. `jobs/<stage>.py` (spark-submit) and `laion-spark <stage>` both
end up here, so a new job is a registry line plus a module with `run(ctx, args)`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from laion_spark.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """A `laion-spark` sub-command: the module that implements it exposes `run(ctx, args)` and,
    optionally, `add_arguments(parser)`."""

    name: str
    module: str
    help: str


COMMANDS: list[Command] = [
    Command("extract", "laion_spark.extract.job", "WARC/WAT files -> candidates table"),
    Command("download", "laion_spark.download.job", "candidates -> images table"),
    Command("export-webdataset", "laion_spark.download.webdataset",
            "images table -> webdataset tar shards"),
    Command("score", "laion_spark.score.job", "images -> pairs table (CLIP + safety tags)"),
    Command("train-demo-clip", "laion_spark.score.demo_model",
            "train the small demo CLIP on generated images and captions"),
    Command("index", "laion_spark.index.job", "pairs -> faiss IVF-PQ indices + metadata"),
    Command("serve", "laion_spark.serve.job",
            "search service + web page over index folders (clip-retrieval compatible)"),
    Command("maintain", "laion_spark.maintain",
            "compact, z-order, checkpoint and vacuum tables; remove stale staging folders"),
    Command("sql", "laion_spark.sql.query", "run SQL over every table of the lake"),
    Command("demo", "laion_spark.demo.pipeline", "run every stage on the generated demo web"),
]


@dataclass
class JobContext:
    """Config plus lazily built Spark session and lake (commands without Spark never start a JVM)."""

    cfg: Config
    _spark: Any = None
    _lake: Any = None
    timings: dict = field(default_factory=dict)

    @property
    def spark(self):
        if self._spark is None:
            from laion_spark.spark import build_spark_session

            self._spark = build_spark_session(self.cfg.spark)
        return self._spark

    @property
    def lake(self):
        if self._lake is None:
            from laion_spark.lake import Lake

            self._lake = Lake(self.spark, self.cfg.lake)
        return self._lake


def configure_logging(level: str = "INFO") -> None:
    """Concise driver logs: time, stage module, message. (Here, not in spark.py, so a command
    without Spark does not import pyspark to log.)"""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "urllib3", "PIL", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config (default: conf/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    parser.add_argument("--lake", default=None, help="lake root (same as --set lake.root=...)")
    parser.add_argument("--log-level", default="INFO")


def load_command(cmd: Command):
    try:
        return importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if exc.name and cmd.module.startswith(exc.name):
            return None
        raise


def context_from_args(args: argparse.Namespace) -> JobContext:
    overrides = list(args.overrides or [])
    if getattr(args, "lake", None):
        overrides.append(f"lake.root={args.lake}")
    cfg = load_config(args.config, overrides)
    return JobContext(cfg)


def run_command(module, args: argparse.Namespace) -> dict:
    """Run one command module with a fresh context; log and return its summary."""
    ctx = context_from_args(args)
    started = time.time()
    had_session = _active_session() is not None
    try:
        summary = module.run(ctx, args) or {}
    finally:
        # Stop only a session this command started (a test or notebook keeps its own).
        if ctx._spark is not None and not had_session:
            ctx._spark.stop()
    elapsed = time.time() - started
    log.info("%s finished in %.1fs: %s", args.command, elapsed, json.dumps(summary, default=str))
    return summary


def _active_session():
    import sys

    if "pyspark" not in sys.modules:
        return None
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def submit_main(command: str, argv: Optional[list[str]] = None) -> int:
    """Entry point of `jobs/<stage>.py` for spark-submit: same arguments as `laion-spark <stage>`."""
    from laion_spark.cli import main

    return main([command, *(argv or [])])
