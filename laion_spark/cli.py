"""`laion-spark <command>`: one sub-command per stage, all sharing --config/--set/--lake."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from laion_spark.config import ConfigError
from laion_spark.job import COMMANDS, add_common_arguments, load_command, run_command
from laion_spark.spark import configure_logging

log = logging.getLogger("laion_spark")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="laion-spark",
        description="Build LAION-5B-style image-text datasets from Common Crawl with Spark + Delta.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for cmd in COMMANDS:
        module = load_command(cmd)
        help_text = cmd.help if module is not None else f"{cmd.help} (not built yet)"
        p = sub.add_parser(cmd.name, help=help_text, description=help_text)
        add_common_arguments(p)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
        modules[cmd.name] = module
    return parser, modules


def main(argv: Optional[list[str]] = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    module = modules[args.command]
    if module is None:
        log.error("command %r is not part of this build yet", args.command)
        return 2
    try:
        run_command(module, args)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
