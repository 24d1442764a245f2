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
    """Adds one partition's rows to copies of the trained empty indices, with local ids 0..n-1,
    and keeps its metadata, its exact top-k for the queries, and the local ids of query rows."""

    def __init__(self, trained: dict[str, bytes], dim: int, queries: Optional[QuerySet]):
        self.dim = dim
        self.indices = {m: deserialize(b) for m, b in trained.items()}
        self.queries = queries
        self.gt: dict[tuple[str, str], ExactTopK] = {}
        if queries is not None and len(queries):
            for idx_mod in self.indices:
                for q_mod, q in queries.vectors.items():
                    self.gt[(idx_mod, q_mod)] = ExactTopK(q)
        self.metadata: list[pa.RecordBatch] = []
        self.self_hits: list[tuple[int, int]] = []  # (query index, local id)
        self.n = 0

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
        ids = np.arange(self.n, self.n + n, dtype=np.int64)
        for m, index in self.indices.items():
            x = vectors[m]
            index.add_with_ids(x, ids)
            for (im, qm), acc in self.gt.items():
                if im == m:
                    acc.add(x, self.n)
        if self.queries is not None and len(self.queries):
            hit = np.isin(uids, self.queries.uids)
            if hit.any():
                pos = {int(u): i for i, u in enumerate(self.queries.uids.tolist())}
                for local in np.nonzero(hit)[0]:
                    self.self_hits.append((pos[int(uids[local])], int(self.n + local)))
        self.n += n

    def write(self, folder: str) -> dict:
        """Write the part (indices, metadata, ground truth) into `folder`; returns a manifest."""
        os.makedirs(folder, exist_ok=True)
        for m, index in self.indices.items():
            faiss.write_index(index, os.path.join(folder, f"{m}.index"))
        if self.metadata or self.n == 0:
            import pyarrow.parquet as pq

            table = (pa.Table.from_batches(self.metadata) if self.metadata
                     else pa.table({c: pa.array([], type=t) for c, t in _METADATA_TYPES.items()}))
            pq.write_table(table, os.path.join(folder, "metadata.parquet"))
        gt = {}
        for (im, qm), acc in self.gt.items():
            gt[f"{im}__{qm}__scores"] = acc.scores
            gt[f"{im}__{qm}__ids"] = acc.ids
        hits = np.array(self.self_hits, dtype=np.int64).reshape(-1, 2)
        np.savez(os.path.join(folder, "gt.npz"), self_hits=hits, **gt)
        return {"rows": self.n, "folder": folder}


_METADATA_TYPES = {
    "uid": pa.int64(), "url": pa.string(), "text": pa.string(), "similarity": pa.float32(),
    "punsafe": pa.float32(), "pwatermark": pa.float32(), "width": pa.int32(),
    "height": pa.int32(),
}


def _metadata_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The metadata columns, types fixed (missing columns become nulls, with a typed schema)."""
    cols = []
    names = batch.schema.names
    for c, t in _METADATA_TYPES.items():
        if c in names:
            col = batch.column(c)
            cols.append(col.cast(t) if col.type != t else col)
        else:
            cols.append(pa.nulls(batch.num_rows, type=t))
    return pa.RecordBatch.from_arrays(cols, names=list(_METADATA_TYPES))


# ----------------------------------------------------------------------------- merge
def merge_parts(trained: bytes, part_indices: list[str], part_rows: list[int], out_path: str,
                on_disk: bool) -> faiss.Index:
    """Merge part indices (local ids) in order into one index whose ids are the global row
    numbers (part offset + local id). In memory with merge_from(add_id); on disk (inverted
    lists in `<out>.ivfdata`, memory-mapped at search) by shifting one part at a time, so the
    driver never holds more than one part."""
    offsets = np.concatenate([[0], np.cumsum(part_rows)[:-1]]).astype(np.int64)
    started = time.time()
    if not on_disk:
        merged = deserialize(trained)
        for path, off in zip(part_indices, offsets):
            part = faiss.read_index(path)
            merged.merge_from(part, int(off))
        faiss.write_index(merged, out_path)
        log.info("merged %d parts in memory (%d vectors) in %.1fs", len(part_indices),
                 merged.ntotal, time.time() - started)
        return merged
    from faiss.contrib.ondisk import merge_ondisk

    shifted_dir = out_path + ".shifted"
    os.makedirs(shifted_dir, exist_ok=True)
    shifted = []
    for i, (path, off) in enumerate(zip(part_indices, offsets)):
        tmp = deserialize(trained)
        tmp.merge_from(faiss.read_index(path), int(off))
        p = os.path.join(shifted_dir, f"{i:05d}.index")
        faiss.write_index(tmp, p)
        shifted.append(p)
        del tmp
    merged = deserialize(trained)
    ivfdata = out_path[: -len(".index")] + ".ivfdata" if out_path.endswith(".index") \
        else out_path + ".ivfdata"
    merge_ondisk(merged, shifted, ivfdata, shift_ids=False)
    faiss.write_index(merged, out_path)
    shutil.rmtree(shifted_dir, ignore_errors=True)
    log.info("merged %d parts on disk (%d vectors, lists in %s) in %.1fs", len(part_indices),
             merged.ntotal, ivfdata, time.time() - started)
    return faiss.read_index(out_path, faiss.IO_FLAG_ONDISK_SAME_DIR)


# ----------------------------------------------------------------------------- tuning + recall
def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
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
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return 0, []
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
