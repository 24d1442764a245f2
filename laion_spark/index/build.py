"""The build, start to end, without Spark: sample → train → parts → merge → metadata → recall.

job.py runs the same steps with Spark doing the counts, the sample and the per-partition add;
`build_local` runs them in one process over an Arrow table (a GPU machine with no JVM, the
benchmark, tests). Both write the same store layout (store.py) and end in `finalize`, which
only reads the store, so the merge can run on another machine (`laion-spark index --merge-only`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_spark.config import IndexConfig
from laion_spark.index import core
from laion_spark.index.params import IndexParams, choose_params
from laion_spark.index.store import Store

log = logging.getLogger(__name__)

GB = 1024 ** 3
MERGE_MODES = ("auto", "ondisk", "memory", "none")


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
                           icfg.train_samples_per_cluster, icfg.index_key, icfg.opq,
                           icfg.max_nlist, icfg.max_train_vectors)
    return params, params.train_size + icfg.recall_queries


def make_plan(n: int, dim: int, icfg: IndexConfig, sample_uids: np.ndarray,
              sample_vectors: dict) -> BuildPlan:
    """Split a uniform random sample into held-out queries and a training set; train.

    `sample_vectors`: per modality float32 arrays, or the raw float16-bytes Arrow column, which
    is then decoded one modality at a time (the driver holds one float32 copy, not two)."""
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
    qv = {}
    trained: dict[str, bytes] = {}
    timings = {}
    per_mod_params = {}
    for mod, v in sample_vectors.items():
        if not isinstance(v, np.ndarray):
            v = core.decode_embeddings(v, dim)
        qv[mod] = v[q_idx]
        started = time.time()
        p = IndexParams(**{**params.to_dict(), "reasons": list(params.reasons)})
        p.train_size = int(len(t_idx))
        index = core.train_index(p, v[t_idx], icfg.use_gpu, icfg.seed,
                                 icfg.opq_iterations)
        trained[mod] = core.serialize(index)
        timings[f"train_{mod}_s"] = round(time.time() - started, 2)
        per_mod_params[mod] = p
        del v, index
    queries = core.QuerySet(np.asarray(sample_uids)[q_idx], qv)
    for note in notes:
        log.info("index plan: %s", note)
    return BuildPlan(dim, n, per_mod_params, trained, queries, timings, notes)


def save_plan(store: Store, plan: BuildPlan, extra: dict) -> None:
    """The trained empty indices, the queries and build.json (no parts yet) into `<out>/build/`."""
    for mod, data in plan.trained.items():
        store.write_bytes(f"build/trained_{mod}.index", data)
    store.write_bytes("build/queries.npz", core.save_queries(plan.queries))
    store.write_json("build/build.json", _plan_json(plan, extra, parts=None))


def _plan_json(plan: BuildPlan, extra: dict, parts: Optional[list[dict]]) -> dict:
    return {"dim": plan.dim, "n_vectors": plan.n_vectors, "modalities": list(plan.params),
            "params": {m: p.to_dict() for m, p in plan.params.items()},
            "timings": plan.timings, "notes": plan.notes, "extra": extra, "parts": parts}


def save_parts(store: Store, plan: BuildPlan, extra: dict, parts: list[dict]) -> list[dict]:
    """Check the parts tile 0..N with no gap or overlap, and record them in build.json."""
    parts = sorted(parts, key=lambda p: p["first"])
    expect = 0
    for p in parts:
        if p["first"] != expect or p["last"] - p["first"] != p["rows"]:
            raise RuntimeError(f"part {p['name']} does not start at id {expect} "
                               f"(parts must tile the ids; a task wrote a wrong range)")
        expect = p["last"]
    if expect != plan.n_vectors:
        raise RuntimeError(f"the parts hold {expect} rows, expected {plan.n_vectors}")
    store.write_json("build/build.json", _plan_json(plan, extra, parts))
    return parts


def load_plan(store: Store) -> tuple[BuildPlan, dict, list[dict]]:
    """What --merge-only needs, from the store alone."""
    info = store.read_json("build/build.json")
    if info.get("parts") is None:
        raise RuntimeError(f"{store.url}: the add step has not finished (no parts in build.json)")
    params = {m: IndexParams(**d) for m, d in info["params"].items()}
    trained = {m: store.read_bytes(f"build/trained_{m}.index") for m in info["modalities"]}
    queries = core.load_queries(store.read_bytes("build/queries.npz"))
    plan = BuildPlan(info["dim"], info["n_vectors"], params, trained, queries,
                     dict(info["timings"]), list(info["notes"]))
    return plan, info["extra"], info["parts"]


def _gt_from_parts(store: Store, plan: BuildPlan, parts: list[dict]):
    """Exact top-k per (index modality, query modality) and each query's own global ids."""
    import io

    accs = {(im, qm): core.ExactTopK(np.zeros((len(plan.queries), plan.dim), np.float32))
            for im in plan.params for qm in plan.queries.vectors}
    self_ids: list[set] = [set() for _ in range(len(plan.queries))]
    for p in parts:
        data = np.load(io.BytesIO(store.read_bytes(f"parts/{p['name']}/gt.npz")))
        for (im, qm), acc in accs.items():
            key = f"{im}__{qm}__"
            if key + "ids" in data:
                acc.merge_part(data[key + "scores"], data[key + "ids"], 0)
        for qi, gid in data["self_hits"]:
            self_ids[int(qi)].add(int(gid))
    return {k: acc.result()[1] for k, acc in accs.items()}, self_ids


def write_single_metadata(store: Store, parts: list[dict], scratch: str) -> int:
    """One metadata.parquet (parts concatenated in id order) for small indices and old readers."""
    tmp = tempfile.mkdtemp(prefix="laion-meta-", dir=scratch or None)
    writer = None
    rows = 0
    try:
        out = os.path.join(tmp, "metadata.parquet")
        for p in parts:
            with store.open(f"metadata/{p['name']}.parquet") as f:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=65_536):
                    if writer is None:
                        writer = pq.ParquetWriter(out, batch.schema, compression="zstd")
                    writer.write_batch(batch)
                    rows += batch.num_rows
        if writer is None:
            pq.write_table(core.metadata_table([], 0), out)
        else:
            writer.close()
        store.put(out, "metadata.parquet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _local_parts(store: Store, parts: list[dict], mod: str, scratch: str) -> Iterator[str]:
    """Each part's index as a local file, one at a time (a remote one is fetched, then removed
    once the consumer moved on: the local disk holds one part)."""
    for p in parts:
        rel = f"parts/{p['name']}/{mod}.index"
        if store.local:
            yield store.get(rel, "")
            continue
        fd, local = tempfile.mkstemp(prefix="laion-part-", suffix=".index", dir=scratch or None)
        os.close(fd)
        try:
            yield store.get(rel, local)
        finally:
            if os.path.exists(local):
                os.remove(local)


def _summed_list_sizes(store: Store, parts: list[dict], mod: str) -> np.ndarray:
    """Entries per inverted list over all parts (from their small sizes.npy, not the parts)."""
    import io

    sizes = None
    for p in parts:
        s = np.load(io.BytesIO(store.read_bytes(f"parts/{p['name']}/{mod}.sizes.npy")))
        sizes = s.astype(np.int64) if sizes is None else sizes + s
    return sizes


def merge_mode(icfg: IndexConfig, params: IndexParams) -> str:
    if icfg.merge not in MERGE_MODES:
        raise ValueError(f"index.merge must be one of {MERGE_MODES}, got {icfg.merge!r}")
    if icfg.merge != "auto":
        return icfg.merge
    return "ondisk" if params.estimated_bytes > icfg.merge_memory_gb * GB else "memory"


def finalize(store: Store, icfg: IndexConfig) -> dict:
    """Merge the parts named in build.json (or serve them as shards), write metadata.parquet
    when small, measure recall, save index_params.json and recall.json. Reads only the store."""
    plan, extra, parts = load_plan(store)
    total = plan.n_vectors
    timings = dict(plan.timings)
    scratch = icfg.merge_dir
    if scratch:
        os.makedirs(scratch, exist_ok=True)
    started = time.time()
    single = total <= icfg.max_single_metadata_rows
    if single:
        n_meta = write_single_metadata(store, parts, scratch)
        if n_meta != total:
            raise RuntimeError(f"metadata has {n_meta} rows but the parts added {total} vectors")
    elif store.exists("metadata.parquet"):
        store.rm("metadata.parquet")
    timings["metadata_s"] = round(time.time() - started, 2)

    truth, self_ids = _gt_from_parts(store, plan, parts)
    report: dict = {"definition": core.RECALL_DEFINITION, "n_vectors": total, "indices": {}}
    params_out: dict = {"n_vectors": total, "dim": plan.dim, "notes": plan.notes,
                        "indices": {}, "single_metadata_parquet": single, **(extra or {})}
    local_out = store.local_dir("", scratch)
    for mod, params in plan.params.items():
        mode = merge_mode(icfg, params)
        started = time.time()
        files = _local_parts(store, parts, mod, scratch)
        local_index = os.path.join(local_out, f"{mod}.index")
        for stale in (f"{mod}.index", f"{mod}.ivfdata"):
            if store.exists(stale):
                store.rm(stale)
        if mode == "memory":
            index = core.merge_in_memory(plan.trained[mod], files)
            faiss.write_index(index, local_index)
        elif mode == "ondisk":
            sizes = _summed_list_sizes(store, parts, mod)
            index = core.merge_on_disk(plan.trained[mod], files, sizes, local_index)
        else:
            index = core.shards_index(files, plan.dim)
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
        del index
        if mode == "none":
            size = sum(store.size(f"parts/{p['name']}/{mod}.index") for p in parts)
        else:
            size = sum(os.path.getsize(os.path.join(local_out, f))
                       for f in (f"{mod}.index", f"{mod}.ivfdata")
                       if os.path.exists(os.path.join(local_out, f)))
            if not store.local:
                for f in (f"{mod}.index", f"{mod}.ivfdata"):
                    if os.path.exists(os.path.join(local_out, f)):
                        store.put(os.path.join(local_out, f), f)
        report["indices"][mod] = {"index_key": params.index_key, "nprobe": nprobe,
                                  "merge": mode, "on_disk": mode == "ondisk", **per_query}
        params_out["indices"][mod] = {**params.to_dict(), "nprobe_curve": curve,
                                      "merge": mode, "on_disk": mode == "ondisk",
                                      "size_bytes": size}
        for r in params.reasons:
            log.info("%s index: %s", mod, r)
        log.info("%s index %s (%s): recall %s", mod, params.index_key, mode, per_query)
    if not store.local:
        shutil.rmtree(local_out, ignore_errors=True)
    params_out["parts"] = len(parts)
    params_out["timings"] = timings
    store.write_json("index_params.json", params_out)
    store.write_json("recall.json", report)
    return {"n_vectors": total, "output": store.url, "timings": timings, "parts": len(parts),
            "indices": {m: {"index_key": v["index_key"], "nprobe": v["nprobe"],
                            "merge": v["merge"],
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
                modalities=core.MODALITIES, batch_rows: int = 16_384,
                model: Optional[dict] = None) -> dict:
    """Build from an Arrow table already filtered and in id order, in this process, into the
    same layout as the Spark job (`out_dir`: a folder or a URL with icfg.storage_options)."""
    started = time.time()
    store = Store(out_dir, icfg.storage_options)
    for stale in ("parts", "metadata", "build"):
        store.rm(stale)
    rows, dim, dropped = prepare_rows(table, None, modalities)
    n = rows.num_rows
    _, n_sample = sample_sizes(n, dim, icfg)
    rng = np.random.default_rng(icfg.seed)
    pick = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    sample = rows.take(pa.array(pick))
    plan = make_plan(n, dim, icfg, sample.column("uid").to_numpy(),
                     {m: sample.column(f"{m}_embedding").combine_chunks() for m in modalities})
    del sample
    extra = {"rows_without_embedding": dropped}
    save_plan(store, plan, extra)
    if model:
        store.write_json("model.json", model)
    parts = []
    add_started = time.time()
    builder = core.PartBuilder(plan.trained, dim, plan.queries)
    for a, b in split_ranges(n, n_parts):
        builder.start(a)
        for batch in rows.slice(a, b - a).to_batches(max_chunksize=batch_rows):
            builder.add_batch(batch)
        parts.append(builder.write(store, icfg.merge_dir))
    del builder
    plan.timings["add_s"] = round(time.time() - add_started, 2)
    save_parts(store, plan, extra, parts)
    summary = finalize(store, icfg)
    summary["rows_without_embedding"] = dropped
    summary["seconds"] = round(time.time() - started, 2)
    return summary
