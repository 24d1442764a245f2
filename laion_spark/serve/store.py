"""One index folder opened for serving: faiss indices memory-mapped, metadata memory-mapped from
Arrow IPC in id order, the model names, the tuned nprobe. No Spark, no pandas, nothing that
grows with the index in the server's heap.

Why Arrow IPC and not the Parquet file: a Parquet row must be decompressed with its whole page;
an IPC file is the in-memory layout on disk, so `take(ids)` on a memory-mapped table touches
only the pages of the rows asked for (clip-retrieval's answer for LAION-5B, CR#213). The single
`metadata.parquet` the index job writes is converted once into `metadata.arrow` beside it (or a
cache folder when the index folder is read-only); per-part `metadata/<first>-<end>.arrow` files
are used as they are.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
_PART_NAME = re.compile(r"^(\d+)-(\d+)\.arrow$")


class IndexFolderError(ValueError):
    """An index folder that cannot be served (missing files, metadata and index disagree)."""


@dataclass
class MetadataPart:
    first: int
    end: int
    table: pa.Table


class Metadata:
    """Rows by id from memory-mapped Arrow IPC files (one, or several parts in id order)."""

    def __init__(self, parts: list[MetadataPart]):
        # One part per record batch: Arrow's take on a many-chunk string column concatenates
        # the chunks first (a copy of the whole column per query: ~100 ms at 1M rows,
        # measured); a take inside one batch touches only the rows asked for.
        split = []
        for p in parts:
            first = p.first
            for batch in p.table.to_batches():
                split.append(MetadataPart(first, first + batch.num_rows,
                                          pa.Table.from_batches([batch])))
                first += batch.num_rows
            if first == p.first:
                split.append(p)
        parts = split
        self.parts = parts
        self.starts = np.array([p.first for p in parts], dtype=np.int64)
        # An empty part shares its start with the next one: searchsorted(side=right) - 1
        # picks the last part starting at or before an id, so empty parts are never chosen.
        self.n = parts[-1].end if parts else 0
        self.columns = parts[0].table.schema.names if parts else []
        self.schema = parts[0].table.schema if parts else pa.schema([])
        self._readers: dict = {}  # (part, column) -> _BufferReader or None (use Arrow's take)

    @classmethod
    def open(cls, folder: str, cache_dir: Optional[str] = None) -> "Metadata":
        part_dir = os.path.join(folder, "metadata")
        if os.path.isdir(part_dir):
            names = sorted(n for n in os.listdir(part_dir) if _PART_NAME.match(n))
            if names:
                parts = []
                expect = 0
                for name in names:
                    first, end = (int(x) for x in _PART_NAME.match(name).groups())
                    if first != expect:
                        raise IndexFolderError(f"{part_dir}: part {name} starts at id {first}, "
                                               f"expected {expect} (a part is missing)")
                    table = _mmap_ipc(os.path.join(part_dir, name))
                    if table.num_rows != end - first:
                        raise IndexFolderError(f"{part_dir}/{name}: {table.num_rows} rows, "
                                               f"name says {end - first}")
                    parts.append(MetadataPart(first, end, table))
                    expect = end
                return cls(parts)
        parquet = os.path.join(folder, "metadata.parquet")
        if not os.path.exists(parquet):
            raise IndexFolderError(f"{folder}: no metadata/ parts and no metadata.parquet")
        arrow = arrow_cache_path(parquet, cache_dir)
        if not os.path.exists(arrow) or os.path.getmtime(arrow) < os.path.getmtime(parquet):
            parquet_to_arrow(parquet, arrow)
        table = _mmap_ipc(arrow)
        return cls([MetadataPart(0, table.num_rows, table)])

    def take(self, ids: np.ndarray, columns: Optional[list[str]] = None) -> pa.Table:
        """Rows for `ids` (valid, 0 <= id < n), in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        cols = [c for c in (columns or self.columns) if c in self.columns]
        if len(self.parts) == 1 or not len(ids):  # no ids: no piece to concatenate
            return self.parts[0].table.select(cols).take(pa.array(ids))
        which = np.searchsorted(self.starts, ids, side="right") - 1
        pieces, positions = [], []
        for p in np.unique(which):
            sel = np.nonzero(which == p)[0]
            part = self.parts[int(p)]
            pieces.append(part.table.select(cols).take(pa.array(ids[sel] - part.first)))
            positions.append(sel)
        table = pa.concat_tables(pieces)
        order = np.argsort(np.concatenate(positions), kind="stable")
        return table.take(pa.array(order))

    def pylists(self, ids: np.ndarray, columns: list[str]) -> dict[str, list]:
        """Python values (None for null) of `columns` for `ids` (valid, in the order given),
        read straight from the memory-mapped buffers: for the few rows of an interactive query
        this skips Arrow's take/concat/to_pylist machinery (~2 ms per 10-row query at 1M rows
        in 16 batches, measured, against ~0.1 ms here). Meant for up to a few thousand ids (a
        Python loop per value); types without a buffer reader (lists, structs, bools,
        dictionaries) are read by Arrow's take."""
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        at = list(zip(which.tolist(), (ids - self.starts[which]).tolist()))
        parts = set(which.tolist())
        out: dict[str, list] = {}
        for col in columns:
            if col not in self.columns:
                continue
            readers = {p: self._reader(p, col) for p in parts}
            if all(r is not None for r in readers.values()):
                out[col] = [readers[p].get(r) for p, r in at]
            else:
                out[col] = [self.parts[p].table.column(col)[r].as_py() for p, r in at]
        return out

    def _reader(self, part: int, col: str) -> Optional["_BufferReader"]:
        key = (part, col)
        reader = self._readers.get(key, False)
        if reader is False:
            chunks = self.parts[part].table.column(col).chunks
            reader = _BufferReader.make(chunks[0]) if len(chunks) == 1 else None
            self._readers[key] = reader
        return reader

    def column_values(self, name: str):
        """A column over every part (a chunked array; memory-mapped, read lazily)."""
        return pa.chunked_array([c for p in self.parts for c in p.table.column(name).chunks],
                                type=self.schema.field(name).type)


class _BufferReader:
    """One column of one record batch read from its Arrow buffers through memoryviews (no copy,
    a Python value per index): fixed-width numbers and (large) strings, nulls from the validity
    bitmap."""

    def __init__(self, values: memoryview, data: Optional[memoryview],
                 valid: Optional[memoryview], offset: int):
        self.values, self.data, self.valid, self.offset = values, data, valid, offset

    @staticmethod
    def _view(buf: pa.Buffer, fmt: str) -> memoryview:
        mv = memoryview(buf)
        size = np.dtype(fmt).itemsize
        return mv[: len(mv) // size * size].cast(fmt)

    @classmethod
    def make(cls, arr: pa.Array) -> Optional["_BufferReader"]:
        t, bufs, off = arr.type, arr.buffers(), arr.offset
        valid = memoryview(bufs[0]) if arr.null_count and bufs[0] is not None else None
        if (pa.types.is_string(t) or pa.types.is_large_string(t)) and bufs[1] is not None:
            offsets = cls._view(bufs[1], "q" if pa.types.is_large_string(t) else "i")
            data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
            return cls(offsets[off:], data, valid, off)
        if (pa.types.is_integer(t) or pa.types.is_floating(t)) and bufs[1] is not None \
                and t.bit_width in (8, 16, 32, 64) and not pa.types.is_float16(t):
            fmt = np.dtype(t.to_pandas_dtype()).char
            return cls(cls._view(bufs[1], fmt)[off:], None, valid, off)
        return None

    def get(self, r: int):
        if self.valid is not None:
            pos = r + self.offset
            if not (self.valid[pos >> 3] >> (pos & 7)) & 1:
                return None
        if self.data is None:
            return self.values[r]
        return str(self.data[self.values[r]:self.values[r + 1]], "utf-8")


def _mmap_ipc(path: str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def arrow_cache_path(parquet: str, cache_dir: Optional[str]) -> str:
    folder = os.path.dirname(os.path.abspath(parquet))
    if cache_dir is None and os.access(folder, os.W_OK):
        return os.path.join(folder, "metadata.arrow")
    base = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "laion-spark-serve")
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.strip("/"))
    return os.path.join(base, key, "metadata.arrow")


def parquet_to_arrow(parquet: str, arrow: str, batch_rows: int = 65_536) -> int:
    """Stream the Parquet file into an uncompressed Arrow IPC file (one batch at a time)."""
    os.makedirs(os.path.dirname(arrow), exist_ok=True)
    tmp = f"{arrow}.tmp-{os.getpid()}"
    pf = pq.ParquetFile(parquet)
    rows = 0
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=batch_rows):
            writer.write_batch(batch)
            rows += batch.num_rows
    os.replace(tmp, arrow)
    log.info("serve: metadata %s -> %s (%d rows, memory-mapped from now on)", parquet, arrow, rows)
    return rows


@dataclass
class IndexFolder:
    """An index folder: its indices per modality, metadata, models, parameters."""

    name: str
    path: str
    indices: dict[str, faiss.Index]
    metadata: Metadata
    dim: int
    nprobe: dict[str, int]
    clip_model: Optional[str]
    text_model: Optional[str]
    params: dict = field(default_factory=dict)
    lake_root: Optional[str] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stats: Optional[dict] = None

    @property
    def n(self) -> int:
        return self.metadata.n

    def search(self, modality: str, query: np.ndarray, k: int, reconstruct: bool,
               large_k_nprobe_per: int = 3000, min_candidates_per_k: float = 3.0):
        """(similarities, ids, vectors or None) of the top k; ids -1 where fewer than k exist.

        A large k from a few lists would stop short, so nprobe is raised for this search until
        the probed lists hold about min_candidates_per_k × k vectors on average (a small tuned
        nprobe, e.g. 1 of 1,024 lists on 1M, holds ~1,000), and for k ≥ 100k to
        ceil(k / large_k_nprobe_per) (clip back's rule)."""
        index = self.indices[modality]
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        k = max(1, min(int(k), max(1, index.ntotal)))
        nprobe = self.nprobe.get(modality) or 0
        params = None
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            want = nprobe or ivf.nprobe
            want = max(want, math.ceil(min_candidates_per_k * k * ivf.nlist
                                       / max(1, ivf.ntotal)))
            if k >= 100_000:
                want = max(want, math.ceil(k / large_k_nprobe_per))
            params = faiss.SearchParametersIVF(nprobe=int(min(want, ivf.nlist)))
        if reconstruct:
            if params is not None:
                d, i, r = index.search_and_reconstruct(q, k, params=params)
            else:
                d, i, r = index.search_and_reconstruct(q, k)
            return d[0], i[0], r[0]
        d, i = index.search(q, k, params=params) if params is not None else index.search(q, k)
        return d[0], i[0], None

    def stats(self) -> dict:
        """Rows per language group and a histogram of the CLIP similarity column (computed once
        per process, over the memory-mapped columns)."""
        with self._lock:
            if self._stats is None:
                self._stats = _compute_stats(self)
            return self._stats


def _compute_stats(folder: IndexFolder) -> dict:
    out: dict = {"rows": folder.n, "dim": folder.dim, "name": folder.name,
                 "clip_model": folder.clip_model, "text_model": folder.text_model,
                 "modalities": sorted(folder.indices)}
    meta = folder.metadata
    if "language_group" in meta.columns:
        counts = pc.value_counts(meta.column_values("language_group"))
        out["language_groups"] = {(c["values"].as_py() or "null"): c["counts"].as_py()
                                  for c in counts}
    if "similarity" in meta.columns:
        sims = meta.column_values("similarity").to_numpy(zero_copy_only=False)
        sims = sims[np.isfinite(sims)]
        hist, edges = np.histogram(sims, bins=24, range=(-0.2, 1.0))
        out["similarity_histogram"] = {"edges": [round(float(e), 3) for e in edges],
                                       "counts": [int(c) for c in hist]}
    for col in ("punsafe", "pwatermark"):
        if col in meta.columns:
            v = meta.column_values(col).to_numpy(zero_copy_only=False)
            v = v[np.isfinite(v)]
            out[f"{col}_mean"] = round(float(v.mean()), 4) if len(v) else None
    recall = os.path.join(folder.path, "recall.json")
    if os.path.exists(recall):
        with open(recall) as f:
            rep = json.load(f)
        out["recall@10"] = {m: {q: v.get("recall@10") for q, v in r.items() if isinstance(v, dict)}
                            for m, r in rep.get("indices", {}).items()}
    return out


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def open_index_folder(name: str, path: str, clip_model: Optional[str] = None,
                      text_model: Optional[str] = None, lake_root: Optional[str] = None,
                      cache_dir: Optional[str] = None) -> IndexFolder:
    """Open `path` for serving. The model: model.json beside the index, else the metadata's
    clip_model/text_model columns, else the flags (the flag wins when given)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise IndexFolderError(f"index folder {path} does not exist")
    indices = {}
    for mod in MODALITIES:
        f = os.path.join(path, f"{mod}.index")
        if not os.path.exists(f):
            continue
        ondisk = os.path.exists(os.path.join(path, f"{mod}.ivfdata"))
        flags = (faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else faiss.IO_FLAG_MMAP) | \
            faiss.IO_FLAG_READ_ONLY
        indices[mod] = faiss.read_index(f, flags)
    if not indices:
        raise IndexFolderError(f"{path}: no image.index or text.index")
    metadata = Metadata.open(path, cache_dir)
    for mod, index in indices.items():
        if index.ntotal != metadata.n:
            raise IndexFolderError(f"{path}: {mod}.index has {index.ntotal} vectors but the "
                                   f"metadata {metadata.n} rows")
    dims = {index.d for index in indices.values()}
    if len(dims) != 1:
        raise IndexFolderError(f"{path}: indices of different dimensions {sorted(dims)}")
    params = _read_json(os.path.join(path, "index_params.json"))
    model = _read_json(os.path.join(path, "model.json"))
    nprobe = {m: int((params.get("indices", {}).get(m, {}) or {}).get("nprobe") or 0)
              for m in indices}
    clip = clip_model or model.get("clip_model") or _first_value(metadata, "clip_model")
    text = text_model or model.get("text_model") or _first_value(metadata, "text_model")
    lake = lake_root or params.get("lake_root") or model.get("lake_root")
    folder = IndexFolder(name, path, indices, metadata, dims.pop(), nprobe, clip, text, params,
                         lake)
    log.info("serve: index %s from %s: %d rows, %s, nprobe %s, model %s / %s", name, path,
             folder.n, {m: type(i).__name__ for m, i in indices.items()}, nprobe, clip, text)
    return folder


def _first_value(metadata: Metadata, column: str) -> Optional[str]:
    if column not in metadata.columns or metadata.n == 0:
        return None
    value = metadata.take(np.array([0]), [column]).column(0)[0].as_py()
    return value or None
