"""`laion-spark export-webdataset`: the `images` table -> webdataset tar shards.

Each successful row becomes `{key}.jpg` (or `.webp`), `{key}.txt` (the alt text) and `{key}.json`
(every metadata column), as img2dataset writes them, so `webdataset.WebDataset(...)` and
training loaders read them unchanged. The key is the uid as 16 hex digits (no dots, stable, and it
joins back to the tables). Reads through the table's Arrow dataset in batches, so memory stays at
one batch plus one tar member whatever the table size.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import time
from typing import Optional

log = logging.getLogger(__name__)

META_COLUMNS = ["uid", "url", "text", "language", "language_group", "status", "error", "http_status",
                "image_format", "width", "height", "original_width", "original_height",
                "image_bytes_sha256", "downloaded_at", "shard"]


def sample_key(uid: int) -> str:
    return f"{uid & 0xFFFFFFFFFFFFFFFF:016x}"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_webdataset(lake, output_dir: str, samples_per_shard: int = 10_000,
                      version: Optional[int] = None, table: str = "images") -> dict:
    """Write `output_dir/{n:05d}.tar`; returns counts. Tars are written to a temp name first."""
    import pyarrow.compute as pc

    os.makedirs(output_dir, exist_ok=True)
    dataset = lake.arrow_dataset(table, version)
    columns = [c for c in META_COLUMNS if c in dataset.schema.names] + ["image"]
    started = time.time()
    n_shards = n_samples = 0
    tar: Optional[tarfile.TarFile] = None
    tmp_path = final_path = ""
    in_shard = 0

    def close_shard() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp_path, final_path)
            tar = None

    try:
        for batch in dataset.to_batches(columns=columns, filter=pc.field("status") == "success"):
            rows = batch.to_pylist()
            for row in rows:
                image = row.pop("image")
                if not image:
                    continue
                if tar is None or in_shard >= samples_per_shard:
                    close_shard()
                    final_path = os.path.join(output_dir, f"{n_shards:05d}.tar")
                    tmp_path = final_path + ".tmp"
                    tar = tarfile.open(tmp_path, "w")
                    n_shards += 1
                    in_shard = 0
                key = sample_key(row["uid"])
                ext = row.get("image_format") or "jpg"
                mtime = row["downloaded_at"].timestamp() if row.get("downloaded_at") else time.time()
                meta = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
                meta["key"] = key
                _add(tar, f"{key}.{ext}", image, mtime)
                _add(tar, f"{key}.txt", (row.get("text") or "").encode("utf-8"), mtime)
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"), mtime)
                in_shard += 1
                n_samples += 1
        close_shard()
    finally:
        if tar is not None:
            tar.close()
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
    summary = {"output": output_dir, "shards": n_shards, "samples": n_samples,
               "seconds": round(time.time() - started, 2)}
    log.info("export-webdataset: %s", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True, help="folder for the .tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--version", type=int, default=None, help="export an older version of `images`")


def run(ctx, args: argparse.Namespace) -> dict:
    return export_webdataset(ctx.lake, args.output, args.samples_per_shard, args.version)
