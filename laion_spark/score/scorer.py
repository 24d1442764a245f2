"""The per-partition work of the score stage, as plain Python over Arrow record batches:
`images` rows in, `pairs` rows out. No Spark here, so the benchmark and a GPU box without a JVM
run the same code the Spark job runs.

Decode and preprocessing of batch k+1 run in background threads while the device embeds batch k
(a bounded queue between them), so the bound is whichever of the two is slower, not their sum.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_spark.score.preprocess import PreprocessSpec, preprocess_bytes

log = logging.getLogger(__name__)

SCORE_FIELDS: list[pa.Field] = [
    pa.field("image_embedding", pa.binary()),
    pa.field("text_embedding", pa.binary()),
    pa.field("similarity", pa.float32()),
    pa.field("passes_filter", pa.bool_()),
    pa.field("punsafe", pa.float32()),
    pa.field("pwatermark", pa.float32()),
    pa.field("ptoxic", pa.float32()),
    pa.field("clip_model", pa.string()),
    pa.field("text_model", pa.string()),
    pa.field("score_error", pa.string()),
]
DROPPED_COLUMNS = ("image",)


@dataclass
class ScoreSettings:
    """What the per-partition scorer needs from ScoreConfig (kept small: it is pickled to executors)."""

    batch_size: int = 256
    thresholds: dict = None  # language_group -> threshold
    default_threshold: float = 0.26
    multilingual_groups: tuple = ("multi", "nolang")
    preprocess_threads: int = 2
    prefetch_batches: int = 2

    @classmethod
    def from_config(cls, score_cfg) -> "ScoreSettings":
        return cls(batch_size=score_cfg.batch_size,
                   thresholds={"en": score_cfg.threshold_en, "multi": score_cfg.threshold_multi,
                               "nolang": score_cfg.threshold_nolang},
                   default_threshold=score_cfg.threshold_multi,
                   multilingual_groups=tuple(score_cfg.use_multilingual_for),
                   preprocess_threads=resolve_preprocess_threads(score_cfg.preprocess_threads,
                                                                 **_spark_slots()))


def auto_preprocess_threads(executor_cores: int, task_cpus: int = 1, gpus_per_executor: float = 0,
                            gpus_per_task: float = 0) -> int:
    """Decode threads per task = the executor's cores / the tasks it runs at once. On a GPU
    executor that is cores per GPU (8 cores, 1 GPU: 8 threads feed it); on CPU, the task's cpus."""
    if gpus_per_executor > 0 and gpus_per_task > 0:
        concurrent = max(1, int(gpus_per_executor / gpus_per_task))
    else:
        concurrent = max(1, executor_cores // max(1, task_cpus))
    return max(1, executor_cores // concurrent)


def resolve_preprocess_threads(setting, **slots) -> int:
    """`score.preprocess_threads`: an int as given, or `auto` from the cluster's slots."""
    if isinstance(setting, int) or (isinstance(setting, str) and setting.strip().isdigit()):
        return max(1, int(setting))
    if setting != "auto":
        raise ValueError(f"score.preprocess_threads must be an int or 'auto', got {setting!r}")
    return auto_preprocess_threads(**slots) if slots else max(1, os.cpu_count() or 1)


def _spark_slots() -> dict:
    """Executor cores, task cpus and GPU amounts from the active session's conf (driver side);
    {} without a session. local[N] is one executor with N cores running N tasks at once."""
    import sys

    if "pyspark" not in sys.modules:
        return {}
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None:
        return {}
    conf = spark.sparkContext.getConf()
    master = spark.sparkContext.master or ""
    local = master.startswith("local")
    cores = int(conf.get("spark.executor.cores", "0") or 0) or (
        spark.sparkContext.defaultParallelism if local else (os.cpu_count() or 1))
    gpus_exec = float(conf.get("spark.executor.resource.gpu.amount", "0") or 0)
    gpus_task = float(conf.get("spark.task.resource.gpu.amount", "0") or 0)
    return {"executor_cores": cores, "task_cpus": int(conf.get("spark.task.cpus", "1") or 1),
            "gpus_per_executor": gpus_exec, "gpus_per_task": gpus_task}


def pairs_schema(images_schema: pa.Schema) -> pa.Schema:
    """`images` minus the bytes, plus the score columns."""
    fields = [f for f in images_schema if f.name not in DROPPED_COLUMNS]
    names = {f.name for f in fields}
    return pa.schema(fields + [f for f in SCORE_FIELDS if f.name not in names])


def embeddings_to_binary(emb: np.ndarray) -> list[bytes]:
    """(N, dim) float -> N little-endian float16 byte strings (LAION's .npy dtype)."""
    arr = np.ascontiguousarray(emb, dtype="<f2")
    return [row.tobytes() for row in arr]


def binary_to_embeddings(values: Iterable[Optional[bytes]], dim: Optional[int] = None) -> np.ndarray:
    """The inverse, for readers of `pairs` (the index stage, tests): nulls become NaN rows."""
    values = list(values)
    if dim is None:
        dim = next((len(v) // 2 for v in values if v), 0)
    out = np.full((len(values), dim), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        if v:
            out[i] = np.frombuffer(v, dtype="<f2")
    return out


def _micro_batches(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Re-chunk the incoming batches (Spark's 8192 rows, a file's row groups) to `size` rows,
    keeping only rows whose download succeeded."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        if "status" in batch.schema.names:
            batch = batch.filter(pc.equal(batch.column("status"), "success"))
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        n += batch.num_rows
        while n >= size:
            table = pa.Table.from_batches(pending)
            head, rest = table.slice(0, size), table.slice(size)
            yield head.combine_chunks().to_batches()[0]
            pending = rest.combine_chunks().to_batches() if rest.num_rows else []
            n = rest.num_rows
    if n:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _prepare(batch: pa.RecordBatch, spec: PreprocessSpec, pool: ThreadPoolExecutor):
    images = batch.column("image").to_pylist()
    results = list(pool.map(lambda b: preprocess_bytes(b, spec), images))
    return batch, results


def _prefetched(batches: Iterator[pa.RecordBatch], spec: PreprocessSpec, threads: int,
                depth: int) -> Iterator[tuple]:
    """Run decode+preprocess in a background thread (itself fanning out to `threads` workers),
    at most `depth` batches ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clip-preprocess") as pool:
                for batch in batches:
                    if stop.is_set():
                        return
                    q.put(_prepare(batch, spec, pool))
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=produce, name="clip-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def score_record_batches(batches: Iterable[pa.RecordBatch], models, settings: ScoreSettings) -> Iterator[pa.RecordBatch]:
    """`images` record batches -> `pairs` record batches (one per micro-batch of `batch_size`).

    A row whose image cannot be decoded keeps its text scores and gets `score_error`, null image
    columns and `passes_filter = false`: one bad image never fails the partition."""
    import torch

    thresholds = settings.thresholds or {}
    for batch, prepared in _prefetched(_micro_batches(batches, settings.batch_size), models.spec,
                                       settings.preprocess_threads, settings.prefetch_batches):
        n = batch.num_rows
        ok = [i for i, (crop, _) in enumerate(prepared) if crop is not None]
        errors = [err for _, err in prepared]
        texts = ["" if t is None else t for t in batch.column("text").to_pylist()]
        groups = (batch.column("language_group").to_pylist() if "language_group" in batch.schema.names
                  else ["en"] * n)
        use_multi = [models.mclip is not None and g in settings.multilingual_groups for g in groups]

        text_emb = torch.empty((n, models.dim), dtype=torch.float32, device=models.device)
        for flag in (False, True):
            idx = [i for i in range(n) if use_multi[i] == flag]
            if idx:
                text_emb[idx] = models.embed_texts([texts[i] for i in idx], multilingual=flag)
        ptoxic = models.safety.text_tags(text_emb)

        image_emb_np = np.full((n, models.dim), np.nan, dtype=np.float32)
        similarity = np.full(n, np.nan, dtype=np.float32)
        punsafe = np.full(n, np.nan, dtype=np.float32)
        pwatermark = np.full(n, np.nan, dtype=np.float32)
        if ok:
            img = models.embed_images(np.stack([prepared[i][0] for i in ok]))
            sims = (img * text_emb[ok]).sum(-1)
            nsfw, wm = models.safety.image_tags(img)
            image_emb_np[ok] = img.cpu().numpy()
            similarity[ok] = sims.cpu().numpy()
            punsafe[ok], pwatermark[ok] = nsfw, wm

        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        thr = np.array([thresholds.get(g, settings.default_threshold) for g in groups], dtype=np.float32)
        passes = valid & (np.nan_to_num(similarity, nan=-2.0) >= thr)
        img_bin = embeddings_to_binary(image_emb_np)
        columns = {name: batch.column(name) for name in batch.schema.names if name not in DROPPED_COLUMNS}
        mask = ~valid
        columns.update({
            "image_embedding": pa.array([None if mask[i] else img_bin[i] for i in range(n)], pa.binary()),
            "text_embedding": pa.array(embeddings_to_binary(text_emb.cpu().numpy()), pa.binary()),
            "similarity": pa.array(similarity, pa.float32(), mask=mask),
            "passes_filter": pa.array(passes, pa.bool_()),
            "punsafe": pa.array(punsafe, pa.float32(), mask=mask),
            "pwatermark": pa.array(pwatermark, pa.float32(), mask=mask),
            "ptoxic": pa.array(ptoxic.astype(np.float32), pa.float32()),
            "clip_model": pa.array([models.clip_name] * n, pa.string()),
            "text_model": pa.array([models.text_model_name if m else models.clip_name for m in use_multi],
                                   pa.string()),
            "score_error": pa.array(errors, pa.string()),
        })
        schema = pairs_schema(batch.schema)
        yield pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) if columns[f.name].type != f.type
                                          else columns[f.name] for f in schema], schema=schema)
