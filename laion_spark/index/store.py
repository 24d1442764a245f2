"""Where an index build lives: a local folder or an s3:// / gs:// URL, through fsspec.

Executors and the driver both open the same Store from (url, options), so parts go straight
from the task that built them to the output, with no driver hop and no shared disk needed.
Local paths stay plain paths (faiss and pyarrow write them in place); a URL is never passed
through os.path (an `s3://b/x` must not become a local folder `s3:/b/x`).

Layout (the contract serve reads; names are id ranges so name order = id order):
    <out>/image.index, <out>/text.index      merged indices (+ .ivfdata when merged on disk)
    <out>/parts/<first:012d>-<last:012d>/     one part per contiguous id range:
        <mod>.index (global ids), <mod>.sizes.npy (inverted-list sizes), gt.npz (exact top-k)
    <out>/metadata/<first:012d>-<last:012d>.parquet and .arrow (Arrow IPC, uncompressed)
    <out>/build/ build.json, trained_<mod>.index, queries.npz  (what --merge-only needs)
    <out>/model.json, index_params.json, recall.json
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Optional


def range_name(first: int, last: int) -> str:
    """`<first_id:012d>-<last_id_exclusive:012d>`: sorts in id order."""
    return f"{first:012d}-{last:012d}"


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Store:
    """A folder (local or remote) with the few operations an index build needs."""

    def __init__(self, url: str, options: Optional[dict[str, Any]] = None):
        import fsspec

        self.options = dict(options or {})
        if is_url(url):
            self.url = url.rstrip("/")
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
            self.local = False
        else:
            if url.startswith("file://"):
                url = url[len("file://"):]
            self.url = os.path.abspath(url)
            self.fs = fsspec.filesystem("file")
            self.root = self.url
            self.local = True

    def __reduce__(self):  # ship (url, options), not a live client, to executors
        return (Store, (self.url, self.options))

    def sub(self, *parts: str) -> "Store":
        return Store(self.join(*parts), self.options)

    def join(self, *parts: str) -> str:
        """The full URL/path of a file under the store."""
        return "/".join([self.url, *[p.strip("/") for p in parts]]) if not self.local \
            else os.path.join(self.url, *parts)

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # ----------------------------------------------------------------- files
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def rm(self, rel: str) -> None:
        p = self._p(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self._p(rel), exist_ok=True)

    def listdir(self, rel: str) -> list[str]:
        p = self._p(rel)
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def put(self, local_path: str, rel: str) -> None:
        """Move a finished local file into the store (atomic rename when local)."""
        dst = self._p(rel)
        if self.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.abspath(local_path) != dst:
                shutil.move(local_path, dst)
            return
        self.fs.put_file(local_path, dst)
        os.remove(local_path)

    def get(self, rel: str, local_path: str) -> str:
        """A local copy of a store file (the file itself when the store is local)."""
        if self.local:
            return self._p(rel)
        self.fs.get_file(self._p(rel), local_path)
        return local_path

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            dst = self._p(rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
            return
        with self.fs.open(self._p(rel), "wb") as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._p(rel), "rb") as f:
            return f.read()

    def open(self, rel: str, mode: str = "rb"):
        if self.local and "w" in mode:
            os.makedirs(os.path.dirname(self._p(rel)), exist_ok=True)
        return self.fs.open(self._p(rel), mode)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, default=_json_default).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def local_dir(self, rel: str, scratch: str = "") -> str:
        """A local folder to build `rel` in: the store's own when local, else a fresh scratch one."""
        if self.local:
            os.makedirs(self._p(rel), exist_ok=True)
            return self._p(rel)
        return tempfile.mkdtemp(prefix="laion-index-", dir=scratch or None)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o))
