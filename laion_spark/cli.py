"""`laion-spark <command>`: one sub-command per stage, all sharing --config/--set/--lake.

Only the chosen command's module is imported (its arguments are added to its sub-parser); the
others get a sub-parser with the common arguments only. Importing every stage would load torch
and pyspark into every process, e.g. ~438 MB in `laion-spark serve`'s supervising process.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from laion_spark.config import ConfigError
from laion_spark.job import (COMMANDS, add_common_arguments, configure_logging, load_command,
                             run_command)

log = logging.getLogger("laion_spark")


def _chosen(argv: Optional[list[str]]) -> Optional[str]:
    """The sub-command named on the command line (the first non-option word), if any; the top
    level takes no options but -h."""
    names = {c.name for c in COMMANDS}
    for a in (sys.argv[1:] if argv is None else argv):
        if not a.startswith("-"):
            return a if a in names else None
    return None


def build_parser(argv: Optional[list[str]] = None,
                 load_all: bool = False) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and {command: module or None}. Only the command named in `argv` is imported
    (every command with `load_all`); a module that is not part of this build is None."""
    parser = argparse.ArgumentParser(
        prog="laion-spark",
        description="Build LAION-5B-style image-text datasets from Common Crawl with Spark + Delta.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    modules = {}
    for cmd in COMMANDS:
        load = load_all or cmd.name == chosen
        module = load_command(cmd) if load else None
        help_text = cmd.help if module is not None or not load else f"{cmd.help} (not built yet)"
        p = sub.add_parser(cmd.name, help=help_text, description=help_text)
        add_common_arguments(p)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
        if load:
            modules[cmd.name] = module
    return parser, modules


def main(argv: Optional[list[str]] = None) -> int:
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    module = modules.get(args.command)
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
