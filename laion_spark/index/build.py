"""The build, start to end, without Spark: sample → train → parts → merge → metadata → recall.

job.py runs the same steps with Spark doing the count, the sample and the per-partition add;
`build_local` runs them in one process over an Arrow table (a GPU machine with no JVM, the
benchmark, tests). Both end in `finalize`, so the files and the recall report are the same.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_spark.config import IndexConfig
from laion_spark.index import core
from laion_spark.index.params import IndexParams, choose_params

log = logging.getLogger(__name__)

GB = 1024 ** 3


@dataclass
class BuildPlan:
    """Everything an executor needs to add its rows: trained empty indices and the queries."""

    dim: int
    n_vectors: int
    params: dict[str, IndexParams]
    trained: dict[str, bytes]
    queries: core.QuerySet
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def sample_sizes(n: int, dim: int, icfg: IndexConfig) -> tuple[IndexParams, int]:
    """Parameters for N vectors and how many rows to sample (training + held-out queries)."""
    params = choose_params(n, dim, int(icfg.memory_budget_gb * GB),
                           icfg.train_samples_per_cluster, icfg.index_key, icfg.opq)
    return params, params.train_size + icfg.recall_queries


def make_plan(n: int, dim: int, icfg: IndexConfig, sample_uids: np.ndarray,
              sample_vectors: dict[str, np.ndarray]) -> BuildPlan:
    """Split a uniform random sample into held-out queries and a training set; train."""
    params, _ = sample_sizes(n, dim, icfg)
    rng = np.random.default_rng(icfg.seed)
    m = len(sample_uids)
    perm = rng.permutation(m)
    nq = min(icfg.recall_queries, m)
    q_idx = perm[:nq]
    notes = []
    enough = min(params.train_size, max(30 * params.nlist, 10_240))
    if m - nq >= enough:
        t_idx = perm[nq: nq + params.train_size]  # held-out queries stay out of training
    else:
        # Small tables: train on every sampled row rather than starve k-means and the PQ.
        t_idx = perm[: params.train_size]
        notes.append(f"small table ({n} rows): the {nq} query rows are also in the "
                     f"{len(t_idx)}-row training sample")
    queries = core.QuerySet(np.asarray(sample_uids)[q_idx],
                            {mod: v[q_idx] for mod, v in sample_vectors.items()})
    trained: dict[str, bytes] = {}
    timings = {}
    per_mod_params = {}
    for mod, v in sample_vectors.items():
        started = time.time()
        p = IndexParams(**{**params.to_dict(), "reasons": list(params.reasons)})
        p.train_size = int(len(t_idx))
        index = core.train_index(p, v[t_idx], icfg.use_gpu, icfg.seed,
                                 icfg.opq_iterations)
        trained[mod] = core.serialize(index)
        timings[f"train_{mod}_s"] = round(time.time() - started, 2)
        per_mod_params[mod] = p
    for note in notes:
        log.info("index plan: %s", note)
    return BuildPlan(dim, n, per_mod_params, trained, queries, timings, notes)


def _gt_from_parts(plan: BuildPlan, folders: list[str], offsets: np.ndarray):
    """Exact top-k per (index modality, query modality) and each query's own global ids."""
    accs = {(im, qm): core.ExactTopK(np.zeros((len(plan.queries), plan.dim), np.float32))
            for im in plan.params for qm in plan.queries.vectors}
    self_ids: list[set] = [set() for _ in range(len(plan.queries))]
    for folder, off in zip(folders, offsets):
        data = np.load(os.path.join(folder, "gt.npz"))
        for (im, qm), acc in accs.items():
            key = f"{im}__{qm}__"
            if key + "ids" in data:
                acc.merge_part(data[key + "scores"], data[key + "ids"], int(off))
        for qi, local in data["self_hits"]:
            self_ids[int(qi)].add(int(local + off))
    return {k: acc.result()[1] for k, acc in accs.items()}, self_ids


def write_metadata(folders: list[str], offsets: np.ndarray, path: str) -> int:
    """Concatenate the parts' metadata in id order, with the id column, into one Parquet file."""
    writer = None
    rows = 0
    for folder, off in zip(folders, offsets):
        f = os.path.join(folder, "metadata.parquet")
        if not os.path.exists(f):
            continue
        if rows != off:
            raise RuntimeError(f"part {folder} starts at id {off} but {rows} rows precede it")
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=65_536):
            ids = pa.array(np.arange(rows, rows + batch.num_rows, dtype=np.int64))
            t = pa.Table.from_batches([batch]).add_column(0, "id", ids)
            if writer is None:
                writer = pq.ParquetWriter(path, t.schema, compression="zstd")
            writer.write_table(t)
            rows += batch.num_rows
    if writer is None:
        empty = pa.table({"id": pa.array([], pa.int64()),
                          **{c: pa.array([], t) for c, t in core._METADATA_TYPES.items()}})
        pq.write_table(empty, path)
    else:
        writer.close()
    return rows


def finalize(out_dir: str, plan: BuildPlan, parts: list[dict], icfg: IndexConfig,
             extra: Optional[dict] = None) -> dict:
    """Merge the parts (in part order: ids = part offset + local id), write metadata, measure
    recall, save index_params.json and recall.json. `parts`: [{"rows", "folder"}] in id order."""
    rows = [int(p["rows"]) for p in parts]
    folders = [p["folder"] for p in parts]
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if rows else np.array([])
    total = int(sum(rows))
    timings = dict(plan.timings)
    os.makedirs(out_dir, exist_ok=True)

    started = time.time()
    n_meta = write_metadata(folders, offsets, os.path.join(out_dir, "metadata.parquet"))
    timings["metadata_s"] = round(time.time() - started, 2)
    if n_meta != total:
        raise RuntimeError(f"metadata has {n_meta} rows but the parts added {total} vectors")

    truth, self_ids = _gt_from_parts(plan, folders, offsets)
    merge_memory = int(icfg.merge_memory_gb * GB)
    report: dict = {"definition": core.RECALL_DEFINITION, "n_vectors": total, "indices": {}}
    params_out: dict = {"n_vectors": total, "dim": plan.dim, "notes": plan.notes,
                        "indices": {}, **(extra or {})}
    for mod, params in plan.params.items():
        on_disk = icfg.ondisk_merge == "always" or (
            icfg.ondisk_merge == "auto" and params.estimated_bytes > merge_memory)
        started = time.time()
        index = core.merge_parts(plan.trained[mod], [os.path.join(f, f"{mod}.index")
                                                     for f in folders],
                                 rows, os.path.join(out_dir, f"{mod}.index"), on_disk)
        timings[f"merge_{mod}_s"] = round(time.time() - started, 2)
        if index.ntotal != total:
            raise RuntimeError(f"{mod} index has {index.ntotal} vectors, expected {total}")
        started = time.time()
        own = plan.queries.vectors.get(mod)
        nprobe, curve = (core.tune_nprobe(index, own, icfg.latency_target_ms)
                         if own is not None and len(own) else (0, []))
        params.nprobe = nprobe or None
        if nprobe:
            params.reasons.append(
                f"nprobe {nprobe}: the largest power of two with p50 single-query latency ≤ "
                f"{icfg.latency_target_ms} ms on this machine (curve in nprobe_curve)")
        timings[f"tune_{mod}_s"] = round(time.time() - started, 2)
        started = time.time()
        per_query = {}
        for qmod, q in plan.queries.vectors.items():
            if not len(q):
                continue
            exclude = self_ids if qmod == mod else [set() for _ in range(len(q))]
            per_query[f"{qmod}_queries"] = core.measure_recall(index, q, truth[(mod, qmod)],
                                                               exclude)
        timings[f"recall_{mod}_s"] = round(time.time() - started, 2)
        report["indices"][mod] = {"index_key": params.index_key, "nprobe": nprobe,
                                  "on_disk": on_disk, **per_query}
        size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
                   if f.startswith(f"{mod}.") and f != f"{mod}.index.tmp")
        params_out["indices"][mod] = {**params.to_dict(), "nprobe_curve": curve,
                                      "on_disk": on_disk, "size_bytes": size}
        for r in params.reasons:
            log.info("%s index: %s", mod, r)
        log.info("%s index %s: recall %s", mod, params.index_key, per_query)
        del index
    params_out["timings"] = timings
    core.write_json(os.path.join(out_dir, "index_params.json"), params_out)
    core.write_json(os.path.join(out_dir, "recall.json"), report)
    return {"n_vectors": total, "output": out_dir, "timings": timings,
            "indices": {m: {"index_key": v["index_key"], "nprobe": v["nprobe"],
                            **{f"{q}_recall@10": v[q]["recall@10"] for q in v
                               if q.endswith("_queries")}}
                        for m, v in report["indices"].items()}}


def split_ranges(n: int, n_parts: int) -> list[tuple[int, int]]:
    n_parts = max(1, min(n_parts, n or 1))
    bounds = np.linspace(0, n, n_parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def prepare_rows(table: pa.Table, dim: Optional[int], modalities=core.MODALITIES
                 ) -> tuple[pa.Table, int, int]:
    """Keep rows whose every indexed embedding is dim × float16; (rows, dim, rows dropped)."""
    cols = [f"{m}_embedding" for m in modalities]
    if dim is None:
        dim = infer_dim(table.column(cols[0]))
    mask = np.ones(table.num_rows, dtype=bool)
    for c in cols:
        mask &= core.embedding_valid_mask(table.column(c).combine_chunks(), dim)
    dropped = int((~mask).sum())
    return table.filter(pa.array(mask)), dim, dropped


def infer_dim(col) -> int:
    """The embedding dimension: the most common byte length / 2 among non-null values."""
    lengths = pc.binary_length(col).drop_null().to_numpy(zero_copy_only=False)
    if not len(lengths):
        raise core.EmbeddingError("no embeddings to infer the dimension from")
    values, counts = np.unique(lengths, return_counts=True)
    return int(values[np.argmax(counts)] // 2)


def build_local(table: pa.Table, out_dir: str, icfg: IndexConfig, n_parts: int = 4,
                modalities=core.MODALITIES, batch_rows: int = 16_384) -> dict:
    """Build from an Arrow table already filtered and in id order, in this process."""
    started = time.time()
    rows, dim, dropped = prepare_rows(table, None, modalities)
    n = rows.num_rows
    _, n_sample = sample_sizes(n, dim, icfg)
    rng = np.random.default_rng(icfg.seed)
    pick = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    sample = rows.take(pa.array(pick))
    plan = make_plan(n, dim, icfg, sample.column("uid").to_numpy(),
                     {m: core.decode_embeddings(sample.column(f"{m}_embedding"), dim)
                      for m in modalities})
    work = os.path.join(out_dir, "_parts")
    parts = []
    add_started = time.time()
    for i, (a, b) in enumerate(split_ranges(n, n_parts)):
        builder = core.PartBuilder(plan.trained, dim, plan.queries)
        for batch in rows.slice(a, b - a).to_batches(max_chunksize=batch_rows):
            builder.add_batch(batch)
        parts.append(builder.write(os.path.join(work, f"part-{i:05d}")))
    plan.timings["add_s"] = round(time.time() - add_started, 2)
    summary = finalize(out_dir, plan, parts, icfg, {"rows_without_embedding": dropped})
    shutil.rmtree(work, ignore_errors=True)
    summary["rows_without_embedding"] = dropped
    summary["seconds"] = round(time.time() - started, 2)
    return summary
