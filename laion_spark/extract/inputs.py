"""Which files an extract run reads: paths, globs, folders, fsspec URLs, Common Crawl listings.

The resolved string of each file is its unit of work (the resume key), so local paths are made
absolute: the same file named from two working directories is one unit.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from urllib.parse import urlparse

from laion_spark.config import ConfigError, ExtractConfig

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".warc", ".warc.gz", ".wat", ".wat.gz", ".warc.wat.gz", ".arc", ".arc.gz")
_GLOB_CHARS = set("*?[")


def _is_remote(path: str) -> bool:
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"


def is_listing(path: str) -> bool:
    """A Common Crawl listing (`warc.paths.gz`, `wat.paths.gz`) or a plain text list of paths."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith((".paths.gz", ".paths", ".paths.txt"))


def read_listing(path: str, prefix: str) -> list[str]:
    """The file URLs of a listing: each line, prefixed when it is a bare crawl-data/ path."""
    import fsspec

    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except FileNotFoundError as exc:
        raise ConfigError(f"extract input listing {path}: not found ({exc})") from None
    out = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if _is_remote(line) or line.startswith("/"):
            out.append(line)
        else:
            out.append(prefix.rstrip("/") + "/" + line.lstrip("/"))
    return out


def _expand(entry: str) -> list[str]:
    if _is_remote(entry):
        if _GLOB_CHARS & set(entry):
            import fsspec

            fs, _ = fsspec.core.url_to_fs(entry)
            protocol = urlparse(entry).scheme
            return sorted(f"{protocol}://{p}" if "://" not in p else p for p in fs.glob(entry))
        _check_remote(entry)
        return [entry]
    local = entry[7:] if entry.startswith("file://") else entry
    if _GLOB_CHARS & set(local):
        # (`**` spans folders, as in fsspec's remote globs)
        return sorted(os.path.abspath(p) for p in glob.glob(local, recursive=True) if os.path.isfile(p))
    if os.path.isdir(local):
        found = sorted(
            os.path.abspath(os.path.join(local, n)) for n in os.listdir(local)
            if n.endswith(_ARCHIVE_SUFFIXES) and os.path.isfile(os.path.join(local, n))
        )
        if not found:
            log.warning("extract input folder %s holds no %s file (its subfolders are not "
                        "searched: name them with a glob, e.g. '%s')", entry, "/".join(_ARCHIVE_SUFFIXES),
                        os.path.join(entry, "**", "*.warc.gz"))
        return found
    if not os.path.exists(local):
        raise ConfigError(f"extract input {entry}: no such file or folder")
    return [os.path.abspath(local)]


def _check_remote(url: str) -> None:
    """Raise ConfigError when a URL named as an input does not exist (an S3 key or HTTP 404),
    so a typo stops the run: the file would otherwise get a `cannot_open` row and count as done.
    One metadata request per named URL (a listing's files are not checked); an error other than
    not-found (network, permissions) only logs, and the task reports it as it reads."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"extract input {url}: not found") from None
    except Exception as exc:  # noqa: BLE001 - left to the task (transient errors are retried there)
        log.warning("extract input %s: could not check it exists: %s: %s", url, type(exc).__name__, exc)


def resolve_inputs(cfg: ExtractConfig) -> list[str]:
    """The ordered, de-duplicated input files; with `sample_files`, a seeded sample without
    replacement (cc2dataset samples with replacement, so it can read one WAT twice)."""
    files: list[str] = []
    for entry in cfg.inputs:
        entry = entry.strip()
        if not entry:
            continue
        if is_listing(entry):
            files.extend(read_listing(entry, cfg.listing_prefix))
        else:
            expanded = _expand(entry)
            if not expanded:
                log.warning("extract input %s matches no file", entry)
            files.extend(expanded)
    files = list(dict.fromkeys(files))
    if cfg.sample_files is not None and cfg.sample_files < len(files):
        files = random.Random(cfg.sample_seed).sample(files, cfg.sample_files)
    return files
