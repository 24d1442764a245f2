"""The index core: plain Python over numpy and Arrow batches, no Spark.

Training, adding a partition, merging parts, exact ground truth, nprobe tuning and recall all
live here, so the same code runs inside a Spark executor, on a GPU machine with no JVM, and in
the benchmark. Spark (job.py) only decides which rows go to which part.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_spark.config import IndexConfig
from laion_spark.index.params import IndexParams

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
METADATA_COLUMNS = ("uid", "url", "text", "similarity", "punsafe", "pwatermark", "width", "height")
GT_K = 100


class EmbeddingError(ValueError):
    """An embedding column that cannot be read as dim × float16."""


# ----------------------------------------------------------------------------- embeddings
def embedding_valid_mask(arr: pa.Array, dim: int) -> np.ndarray:
    """Rows whose embedding is present and exactly dim × 2 bytes."""
    arr = _as_binary(arr)
    lengths = pc.binary_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
    return lengths == dim * 2


def decode_embeddings(arr: pa.Array, dim: int) -> np.ndarray:
    """Float16 little-endian bytes → float32 (n, dim), re-normalised (inner product = cosine).

    Every value must be valid (filter with embedding_valid_mask first): a short or null vector
    would shift all the rows after it.
    """
    arr = _as_binary(arr)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if arr.null_count or not embedding_valid_mask(arr, dim).all():
        raise EmbeddingError(f"embedding column has null or non-{dim}-d values")
    offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    x = data.view("<f2").reshape(n, dim).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def _as_binary(arr):
    t = arr.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return arr
    return arr.cast(pa.large_binary())


def encode_embeddings(x: np.ndarray) -> pa.Array:
    """float → L2-normalised float16 bytes per row (the `pairs` contract); for tests and tools."""
    x = np.asarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    h = x.astype("<f2")
    n, d = h.shape
    offsets = pa.array(np.arange(0, (n + 1) * d * 2, d * 2, dtype=np.int32))
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets.buffers()[1],
                                                         pa.py_buffer(h.tobytes())])


# ----------------------------------------------------------------------------- training
def new_index(params: IndexParams) -> faiss.Index:
    return faiss.index_factory(params.dim, params.index_key, faiss.METRIC_INNER_PRODUCT)


def train_index(params: IndexParams, sample: np.ndarray, use_gpu: bool = False,
                seed: int = 0,
                opq_iterations: int = IndexConfig.opq_iterations) -> faiss.Index:
    """Train an empty index on `sample` (already a uniform random sample); k-means on the GPU
    when faiss has one and it is asked for (the step where a GPU pays: 5–10×).

    OPQ alternates rotation and PQ training `opq_iterations` times (faiss's default is 50; on a
    2-core machine the OPQ step was the larger half of training a 1M × 512-d OPQ96 index)."""
    index = new_index(params)
    _set_opq_iterations(index, opq_iterations)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = 256
        if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            d_ivf = ivf.d
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(
                faiss.IndexFlat(d_ivf, faiss.METRIC_INNER_PRODUCT))
            log.info("k-means on %d GPU(s)", faiss.get_num_gpus())
        elif use_gpu:
            log.warning("index.use_gpu set but faiss has no GPU here: training on CPU")
    started = time.time()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    log.info("trained %s on %d vectors in %.1fs", params.index_key, len(sample),
             time.time() - started)
    if ivf is not None and ivf.clustering_index is not None:
        ivf.clustering_index = None
    return index


def _set_opq_iterations(index: faiss.Index, iterations: int) -> None:
    if not isinstance(index, faiss.IndexPreTransform):
        return
    for i in range(index.chain.size()):
        vt = faiss.downcast_VectorTransform(index.chain.at(i))
        if isinstance(vt, faiss.OPQMatrix):
            vt.niter = int(iterations)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# ----------------------------------------------------------------------------- exact search
class ExactTopK:
    """Running exact top-k of a fixed query set over vectors seen batch by batch.

    Each part keeps its own (local ids); the driver merges parts with their id offsets, so the
    ground truth costs one matrix product per batch on the executors, no second pass.
    """

    def __init__(self, queries: np.ndarray, k: int = GT_K):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        nq = len(self.q)
        self.scores = np.full((nq, 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((nq, 0), dtype=np.int64)

    def add(self, x: np.ndarray, first_id: int) -> None:
        if len(x) == 0 or len(self.q) == 0:
            return
        s = self.q @ x.T
        ids = np.broadcast_to(np.arange(first_id, first_id + len(x), dtype=np.int64), s.shape)
        self._merge(s, ids)

    def _merge(self, s: np.ndarray, ids: np.ndarray) -> None:
        s = np.concatenate([self.scores, s], axis=1)
        ids = np.concatenate([self.ids, ids], axis=1)
        if s.shape[1] > self.k:
            top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
            s = np.take_along_axis(s, top, axis=1)
            ids = np.take_along_axis(ids, top, axis=1)
        self.scores, self.ids = s, ids

    def merge_part(self, scores: np.ndarray, ids: np.ndarray, offset: int) -> None:
        self._merge(scores, ids + offset)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) sorted best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return (np.take_along_axis(self.scores, order, axis=1),
                np.take_along_axis(self.ids, order, axis=1))


# ----------------------------------------------------------------------------- one part
@dataclass
class QuerySet:
    """Held-out queries: their uids (to drop the query row itself from same-modality results)
    and their embeddings per modality ("image", "text")."""

    uids: np.ndarray
    vectors: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.uids)


class PartBuilder:
    """Adds rows to copies of the trained empty indices with their global ids, one contiguous
    id range (a part) at a time, and keeps the part's metadata, its exact top-k for the
    queries, and the global ids of query rows. The trained indices are deserialised once per
    task and reset between parts."""

    def __init__(self, trained: dict[str, bytes], dim: int, queries: Optional[QuerySet]):
        self.dim = dim
        self.indices = {m: deserialize(b) for m, b in trained.items()}
        self.queries = queries
        self._qpos = ({int(u): i for i, u in enumerate(queries.uids.tolist())}
                      if queries is not None and len(queries) else {})
        self.start(0)

    def start(self, first_id: int) -> None:
        """Begin a part whose first row gets id `first_id`."""
        for index in self.indices.values():
            index.reset()
        self.first = int(first_id)
        self.gt: dict[tuple[str, str], ExactTopK] = {}
        if self.queries is not None and len(self.queries):
            for idx_mod in self.indices:
                for q_mod, q in self.queries.vectors.items():
                    self.gt[(idx_mod, q_mod)] = ExactTopK(q)
        self.metadata: list[pa.RecordBatch] = []
        self.self_hits: list[tuple[int, int]] = []  # (query index, global id)
        self.n = 0

    @property
    def next_id(self) -> int:
        return self.first + self.n

    def add_batch(self, batch: pa.RecordBatch) -> None:
        """Rows must already pass the filter and have valid embeddings (every indexed modality)."""
        if batch.num_rows == 0:
            return
        vectors = {m: decode_embeddings(batch.column(f"{m}_embedding"), self.dim)
                   for m in self.indices}
        self.add_arrays(vectors, batch.column("uid").to_numpy(zero_copy_only=False))
        self.metadata.append(_metadata_batch(batch))

    def add_arrays(self, vectors: dict[str, np.ndarray], uids: np.ndarray) -> None:
        """Add float32 normalised vectors (one array per indexed modality) with the next ids."""
        n = len(uids)
        first = self.next_id
        ids = np.arange(first, first + n, dtype=np.int64)
        for m, index in self.indices.items():
            x = vectors[m]
            index.add_with_ids(x, ids)
            for (im, qm), acc in self.gt.items():
                if im == m:
                    acc.add(x, first)
        if self._qpos:
            hit = np.isin(uids, self.queries.uids)
            for local in np.nonzero(hit)[0]:
                self.self_hits.append((self._qpos[int(uids[local])], int(first + local)))
        self.n += n

    def write(self, store, scratch: str = "") -> dict:
        """Write the part (indices, list sizes, ground truth) to `<store>/parts/<range>/` and its
        metadata to `<store>/metadata/<range>.parquet|.arrow`; returns its manifest."""
        from laion_spark.index.store import range_name

        name = range_name(self.first, self.first + self.n)
        tmp = tempfile.mkdtemp(prefix="laion-part-", dir=scratch or None)
        try:
            for m, index in self.indices.items():
                local = os.path.join(tmp, f"{m}.index")
                faiss.write_index(index, local)
                store.put(local, f"parts/{name}/{m}.index")
                sizes = os.path.join(tmp, f"{m}.sizes.npy")
                np.save(sizes, list_sizes(index))
                store.put(sizes, f"parts/{name}/{m}.sizes.npy")
            gt = {}
            for (im, qm), acc in self.gt.items():
                gt[f"{im}__{qm}__scores"] = acc.scores
                gt[f"{im}__{qm}__ids"] = acc.ids
            hits = np.array(self.self_hits, dtype=np.int64).reshape(-1, 2)
            local = os.path.join(tmp, "gt.npz")
            np.savez(local, self_hits=hits, **gt)
            store.put(local, f"parts/{name}/gt.npz")
            table = metadata_table(self.metadata, self.first)
            write_metadata_files(table, store, f"metadata/{name}", tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"first": self.first, "last": self.first + self.n, "rows": self.n, "name": name}


_METADATA_TYPES = {
    "uid": pa.int64(), "url": pa.string(), "text": pa.string(), "similarity": pa.float32(),
    "punsafe": pa.float32(), "pwatermark": pa.float32(), "width": pa.int32(),
    "height": pa.int32(),
}
# Carried into the metadata when the table has them (not every pairs table does).
_OPTIONAL_METADATA_TYPES = {"language": pa.string(), "language_group": pa.string(),
                            "ptoxic": pa.float32()}


def _metadata_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The metadata columns, types fixed (missing columns become nulls, with a typed schema)."""
    cols, names = [], []
    present = batch.schema.names
    for c, t in list(_METADATA_TYPES.items()) + list(_OPTIONAL_METADATA_TYPES.items()):
        if c in present:
            col = batch.column(c)
            cols.append(col.cast(t) if col.type != t else col)
        elif c in _METADATA_TYPES:
            cols.append(pa.nulls(batch.num_rows, type=t))
        else:
            continue
        names.append(c)
    return pa.RecordBatch.from_arrays(cols, names=names)


def metadata_table(batches: list[pa.RecordBatch], first_id: int) -> pa.Table:
    """The part's metadata with its `id` column first (row i of the part = id first_id + i)."""
    table = (pa.Table.from_batches(batches) if batches
             else pa.table({c: pa.array([], type=t) for c, t in _METADATA_TYPES.items()}))
    ids = pa.array(np.arange(first_id, first_id + table.num_rows, dtype=np.int64))
    return table.add_column(0, "id", ids)


def write_metadata_files(table: pa.Table, store, rel_stem: str, tmp: str) -> None:
    """`<stem>.parquet` (zstd, for tools) and `<stem>.arrow` (Arrow IPC file, uncompressed, so
    serve can memory-map it and read a hit's row with no decode)."""
    import pyarrow.parquet as pq

    local = os.path.join(tmp, "metadata.parquet")
    pq.write_table(table, local, compression="zstd")
    store.put(local, rel_stem + ".parquet")
    local = os.path.join(tmp, "metadata.arrow")
    with pa.OSFile(local, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=65_536)
    store.put(local, rel_stem + ".arrow")


# ----------------------------------------------------------------------------- merge
def list_sizes(index: faiss.Index) -> np.ndarray:
    """Entries per inverted list (int64, nlist)."""
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    return np.array([inv.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def merge_in_memory(trained: bytes, part_paths: Iterable[str]) -> faiss.Index:
    """Parts carry global ids already: merge_from with no shift, one part read at a time."""
    merged = deserialize(trained)
    for path in part_paths:
        merged.merge_from(faiss.read_index(path), 0)
    return merged


def merge_on_disk(trained: bytes, part_paths: Iterable[str], sizes: np.ndarray,
                  out_index: str) -> faiss.Index:
    """Stream parts (global ids) into `<out_index stem>.ivfdata` with bounded RAM.

    `sizes` (the summed list sizes of all parts, from their sizes.npy) fixes every list's
    place in the file up front, so each part is read once, its lists written at their cursor
    with pwrite (no mmap: the driver's RSS does not grow with the index), and dropped; the
    local disk holds the .ivfdata plus one part. The result is faiss's own OnDiskInvertedLists
    layout (capacity = size), opened with IO_FLAG_ONDISK_SAME_DIR."""
    from faiss.contrib.inspect_tools import get_invlist

    template = deserialize(trained)
    ivf = faiss.extract_index_ivf(template)
    nlist, cs = ivf.nlist, ivf.code_size
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) != nlist:
        raise ValueError(f"list sizes for {len(sizes)} lists, index has {nlist}")
    nbytes = sizes * (cs + 8)
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    total = int(nbytes.sum())
    ivfdata = (out_index[: -len(".index")] if out_index.endswith(".index") else out_index) \
        + ".ivfdata"
    started = time.time()
    cursor = np.zeros(nlist, dtype=np.int64)
    with open(ivfdata, "wb") as f:
        f.truncate(total)
    fd = os.open(ivfdata, os.O_WRONLY)
    n_parts = 0
    try:
        for path in part_paths:
            part = faiss.read_index(path)
            inv = faiss.extract_index_ivf(part).invlists
            psizes = list_sizes(part)
            for lst in np.nonzero(psizes)[0]:
                ids, codes = get_invlist(inv, int(lst))
                n = len(ids)
                if cursor[lst] + n > sizes[lst]:
                    raise RuntimeError(f"list {lst}: parts hold more entries than sizes.npy says")
                os.pwrite(fd, codes.tobytes(), int(offsets[lst] + cursor[lst] * cs))
                os.pwrite(fd, ids.tobytes(),
                          int(offsets[lst] + sizes[lst] * cs + cursor[lst] * 8))
                cursor[lst] += n
            n_parts += 1
            del part, inv
    finally:
        os.close(fd)
    if not np.array_equal(cursor, sizes):
        raise RuntimeError("the parts' lists do not add up to their sizes.npy")
    dummy = f"{ivfdata}.tmp-{os.getpid()}"
    il = faiss.OnDiskInvertedLists(nlist, cs, dummy)
    meta = faiss.OnDiskOneListVector()
    for lst in range(nlist):
        one = faiss.OnDiskOneList()
        one.size = one.capacity = int(sizes[lst])
        one.offset = int(offsets[lst])
        meta.push_back(one)
    il.lists.swap(meta)
    il.totsize = total
    il.filename = ivfdata
    ivf.replace_invlists(il, False)  # `il` stays owned by Python until the index is written
    template.ntotal = int(sizes.sum())
    ivf.ntotal = int(sizes.sum())
    faiss.write_index(template, out_index)
    del template, ivf, il
    if os.path.exists(dummy):
        os.remove(dummy)
    log.info("merged %d parts on disk (%d vectors, lists in %s, %.1f MB) in %.1fs", n_parts,
             int(sizes.sum()), ivfdata, total / 1e6, time.time() - started)
    return faiss.read_index(out_index, faiss.IO_FLAG_ONDISK_SAME_DIR)


def shards_index(part_paths: Iterable[str], dim: int) -> faiss.Index:
    """The parts served unmerged (index.merge = none): one IndexShards over them, ids global."""
    shards = faiss.IndexShards(dim, False, False)  # not threaded; ids are the parts' own
    for path in part_paths:
        shards.add_shard(faiss.read_index(path))
    return shards


def _ivf_parts(index: faiss.Index) -> list:
    """The IVF indices inside `index` (one, or one per shard)."""
    if isinstance(index, faiss.IndexShards):
        shards = index
        out = []
        for i in range(shards.count()):
            ivf = faiss.try_extract_index_ivf(faiss.downcast_index(shards.at(i)))
            if ivf is not None:
                out.append(ivf)
        return out
    ivf = faiss.try_extract_index_ivf(index)
    return [ivf] if ivf is not None else []


# ----------------------------------------------------------------------------- tuning + recall
def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    for ivf in _ivf_parts(index):
        ivf.nprobe = int(nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * int(nprobe))


def single_query_latency_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """One query at a time, as a search service sees them."""
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[i: i + 1], k)
        out[i] = (time.perf_counter() - t) * 1000
    return out


def tune_nprobe(index: faiss.Index, queries: np.ndarray, target_ms: float,
                n_timing_queries: int = 200) -> tuple[int, list[dict]]:
    """The largest power-of-two nprobe whose p50 single-query latency (k=10) is within target
    (autofaiss's rule, with p50 so one slow query on a busy machine does not decide it)."""
    ivfs = _ivf_parts(index)
    if not ivfs:
        return 0, []
    ivf = ivfs[0]
    q = np.ascontiguousarray(queries[:n_timing_queries], dtype=np.float32)
    curve = []
    best = 1
    nprobe = 1
    while nprobe <= ivf.nlist:
        set_nprobe(index, nprobe)
        index.search(q[:5], 10)  # warm-up
        lat = single_query_latency_ms(index, q)
        p50 = float(np.percentile(lat, 50))
        curve.append({"nprobe": nprobe, "p50_ms": round(p50, 3),
                      "p99_ms": round(float(np.percentile(lat, 99)), 3)})
        if p50 > target_ms:
            break
        best = nprobe
        if nprobe == ivf.nlist:
            break
        nprobe = min(nprobe * 2, ivf.nlist)
    set_nprobe(index, best)
    return best, curve


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: |returned top-k ∩ true top-k| / k, averaged over queries."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        hits += len(np.intersect1d(f[f >= 0], t))
    return hits / (k * len(truth))


def nn_recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """faiss's 1-recall@k: the fraction of queries whose true nearest neighbour is returned in
    the top k."""
    return float(np.mean([t[0] in f[:k] for f, t in zip(found, truth)]))


def drop_ids(ids: np.ndarray, exclude: list[set], k: int) -> np.ndarray:
    """Per query, remove excluded ids (the query row itself) and keep the first k."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, row in enumerate(ids):
        kept = [x for x in row if x not in exclude[i]][:k] if exclude[i] else list(row[:k])
        out[i, : len(kept)] = kept
    return out


def measure_recall(index: faiss.Index, queries: np.ndarray, truth_ids: np.ndarray,
                   exclude: list[set], ks=(1, 10, 100)) -> dict:
    """Recall of `index` (at its current nprobe) against exact top-k, and single-query latency."""
    kmax = max(ks)
    n_excl = max((len(e) for e in exclude), default=0)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, found = index.search(q, kmax + n_excl)
    found = drop_ids(found, exclude, kmax)
    truth = drop_ids(truth_ids, exclude, kmax)
    lat = single_query_latency_ms(index, q, k=10)
    out = {"queries": int(len(q))}
    for k in ks:
        out[f"recall@{k}"] = round(recall_at(found, truth, k), 4)
    for k in ks:
        out[f"nn_recall@{k}"] = round(nn_recall_at(found, truth, k), 4)
    out["latency_p50_ms"] = round(float(np.percentile(lat, 50)), 3)
    out["latency_p99_ms"] = round(float(np.percentile(lat, 99)), 3)
    return out


RECALL_DEFINITION = (
    "recall@k = |returned top-k ∩ exact top-k| / k, averaged over the held-out queries "
    "(exact = brute-force inner product over every indexed vector); nn_recall@k = fraction of "
    "queries whose exact nearest neighbour is in the returned top-k (faiss's 1-recall@k). For "
    "same-modality queries the query's own row is removed from both lists (it would be a "
    "trivial hit); text queries on the image index (and image queries on the text index) keep "
    "it. Latency: one query at a time, k=10, at the chosen nprobe."
)


def save_queries(queries: QuerySet) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, uids=queries.uids, **{f"v_{m}": v for m, v in queries.vectors.items()})
    return buf.getvalue()


def load_queries(data: bytes) -> QuerySet:
    import io

    z = np.load(io.BytesIO(data))
    return QuerySet(z["uids"], {k[2:]: z[k] for k in z.files if k.startswith("v_")})


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def iter_batches(table: pa.Table, rows: int) -> Iterable[pa.RecordBatch]:
    for b in table.to_batches(max_chunksize=rows):
        yield b
