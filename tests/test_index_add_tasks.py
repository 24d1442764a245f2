"""The add step's executor body without Spark: consecutive tasks of one build in one Python worker
deserialise the trained index once, write the same parts as fresh builders would, and a new
build (another token) gets its own builder."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_spark.index import core, job
from laion_spark.index.params import choose_params
from laion_spark.index.store import Store
from laion_spark.index.synthetic import synthetic_pairs

DIM = 16


class _Shipped:  # what a Broadcast gives a task: .value
    def __init__(self, value):
        self.value = value


def _task_batches(table: pa.Table, file: str):
    t = table.append_column(job.FILE_COL, pa.array([file] * table.num_rows))
    t = t.append_column(job.ROW_COL, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return t.to_batches(max_chunksize=250)


def test_tasks_share_one_builder_per_build(tmp_path, monkeypatch):
    table = synthetic_pairs(1500, dim=DIM, seed=7, n_clusters=8)
    x = core.decode_embeddings(table.column("image_embedding").combine_chunks(), DIM)
    trained = core.serialize(core.train_index(choose_params(1500, DIM, 10 ** 9,
                                                            index_key="IVF16,Flat"), x))
    files = {"a.parquet": table.slice(0, 600), "b.parquet": table.slice(600, 900)}
    offsets = {("a.parquet", 0): (0, 600), ("b.parquet", 0): (600, 900)}
    shipped = _Shipped(({"image": trained}, DIM, None, offsets))
    calls = []
    real = core.deserialize
    monkeypatch.setattr(core, "deserialize", lambda b: calls.append(1) or real(b))
    monkeypatch.setattr(job, "_BUILDER_CACHE", {})

    store = Store(str(tmp_path / "out"))
    fn = job._add_partition_fn(shipped, store, "build-1")
    out = [list(fn(iter(_task_batches(t, f)))) for f, t in files.items()]  # two tasks
    assert len(calls) == 1  # one deserialise for both tasks
    rows = [b.to_pylist()[0] for task in out for b in task]
    assert [(r["first"], r["last"]) for r in rows] == [(0, 600), (600, 1500)]
    meta = pq.read_table(os.path.join(store.url, "metadata", rows[1]["name"] + ".parquet"))
    assert meta.column("id").to_pylist() == list(range(600, 1500))  # nothing left from task 1
    assert meta.column("uid").to_pylist() == table.column("uid").to_pylist()[600:]
    part = core.deserialize(open(os.path.join(store.url, "parts", rows[1]["name"],
                                              "image.index"), "rb").read())
    assert part.ntotal == 900

    list(job._add_partition_fn(shipped, Store(str(tmp_path / "o2")), "build-2")(
        iter(_task_batches(files["a.parquet"], "a.parquet"))))
    assert len(calls) == 3  # a new build deserialises its own (the part read above is one)
