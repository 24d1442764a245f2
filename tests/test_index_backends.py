"""Id order does not depend on the lake backend: one table version indexed through delta-spark
and through delta-rs gives the same ids → uid map, the same metadata order and the same vectors
under each id, and both follow (file path, row in file) of that version's files.

Why: ids come from `_metadata.file_path` / `row_index` of the version's scan, and Delta's own
reader (delta-spark) has no `row_index` (the job failed there with FIELD_NOT_FOUND before the
index job read the version's files as plain Parquet on both backends: `lake.read(as_parquet=True)`).
A backend that listed other files (a later version's) or spelled paths differently would
renumber a served index."""
from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import make_lake
from laion_spark.index.job import run_index
from laion_spark.index.synthetic import synthetic_pairs
from test_index_job import DIM, _append, _cfg, _expected, _file_order_uids


def _ids_to_vectors(index_path: str, n: int) -> np.ndarray:
    index = faiss.read_index(index_path)
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()
    return np.stack([index.reconstruct(i) for i in range(n)])


def test_same_ids_and_metadata_order_on_both_backends(spark, lake, tmp_path):
    # Three commits by the backend under test (2 files each at local[2]); version 1 is indexed,
    # so both backends time-travel past version 2's files.
    tables = [synthetic_pairs(500, dim=DIM, seed=s, n_clusters=10, start=10_000 * s)
              for s in (1, 2, 3)]
    for i, t in enumerate(tables):
        _append(spark, lake, t, f"shard-{i}")
    assert lake.version("pairs") == 2
    expected = _expected(pa.concat_tables(tables[:2]), lambda r: r["passes_filter"])

    metas, vectors = {}, {}
    for backend in ("delta-spark", "delta-rs"):
        reader = make_lake(spark, lake.root, backend)
        assert reader.backend == backend
        summary = run_index(spark, _cfg(tmp_path / backend, table_version=1, merge="memory",
                                        modalities=["image"], recall_queries=20), reader)
        assert summary["n_vectors"] == len(expected)
        meta = pq.read_table(os.path.join(summary["output"], "metadata.parquet"))
        assert meta.column("id").to_pylist() == list(range(len(expected)))
        metas[backend] = meta
        vectors[backend] = _ids_to_vectors(os.path.join(summary["output"], "image.index"),
                                           len(expected))

    spark_meta, rs_meta = metas["delta-spark"], metas["delta-rs"]
    uids = spark_meta.column("uid").to_pylist()
    assert sorted(uids) == sorted(expected)  # every passing row of version 1 once
    assert uids == _file_order_uids(lake, 1)  # (file path, row in file) of version 1's files
    assert spark_meta.equals(rs_meta)  # same ids → uid, same metadata columns and order
    assert np.array_equal(vectors["delta-spark"], vectors["delta-rs"])  # same vector per id
