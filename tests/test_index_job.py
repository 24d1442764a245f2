"""The Spark index job on a generated `pairs` table: every passing row indexed exactly once, ids
map back to their uid, re-builds of one table version give the same order, recall is saved."""
from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_spark.config import Config, IndexConfig
from laion_spark.index import core
from laion_spark.index.job import run_index
from laion_spark.index.synthetic import synthetic_pairs

DIM = 32


def _append(spark, lake, table: pa.Table, unit: str):
    return lake.append("pairs", spark.createDataFrame(table.to_pandas()), stage="score",
                       units=[unit])


def _with_bad_rows(table: pa.Table) -> pa.Table:
    """Two passing rows whose embeddings cannot be indexed (null, wrong length)."""
    bad = synthetic_pairs(2, dim=DIM, seed=99, pass_rate=1.0)
    img = bad.column("image_embedding").to_pylist()
    img[0] = None
    img[1] = img[1][:10]
    bad = bad.set_column(bad.schema.get_field_index("image_embedding"), "image_embedding",
                         pa.array(img, pa.binary()))
    return pa.concat_tables([table, bad])


def _all_ids(index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            out.append(faiss.rev_swig_ptr(inv.get_ids(lst), n).copy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _cfg(tmp_path, **index) -> Config:
    cfg = Config()
    cfg.index = IndexConfig(**{"output": str(tmp_path / "indices"), "recall_queries": 100,
                               "rows_per_part": 700, **index})
    return cfg


@pytest.fixture()
def pairs_lake(spark, lake):
    t0 = _with_bad_rows(synthetic_pairs(1800, dim=DIM, seed=1, n_clusters=20))
    _append(spark, lake, t0, "shard-0")  # version 0
    t1 = synthetic_pairs(1200, dim=DIM, seed=2, n_clusters=20, start=5000)
    _append(spark, lake, t1, "shard-1")  # version 1
    return lake, pa.concat_tables([t0, t1])


def _expected(table: pa.Table, filt) -> dict[int, dict]:
    rows = [r for r in table.to_pylist() if filt(r)]
    return {r["uid"]: r for r in rows
            if r["image_embedding"] is not None and len(r["image_embedding"]) == DIM * 2}


def test_every_passing_row_once_and_ids_map_to_uid(spark, pairs_lake, tmp_path):
    lake, table = pairs_lake
    summary = run_index(spark, _cfg(tmp_path), lake)
    out = summary["output"]
    assert out.endswith("pairs-v1")
    expected = _expected(table, lambda r: r["passes_filter"])
    assert summary["rows_without_embedding"] == 2
    assert summary["n_vectors"] == len(expected)
    assert summary["parts"] >= 3

    meta = pq.read_table(os.path.join(out, "metadata.parquet"))
    assert meta.column("id").to_pylist() == list(range(meta.num_rows))
    uids = meta.column("uid").to_pylist()
    assert sorted(uids) == uids  # ordered by uid
    assert set(uids) == set(expected) and len(uids) == len(expected)

    for m in ("image", "text"):
        index = faiss.read_index(os.path.join(out, f"{m}.index"))
        ids = _all_ids(index)
        assert len(ids) == len(expected)
        assert np.array_equal(np.sort(ids), np.arange(len(expected)))  # each id exactly once
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        for i in range(0, len(uids), 97):
            row = expected[uids[i]]
            want = core.decode_embeddings(pa.array([row[f"{m}_embedding"]]), DIM)[0]
            got = index.reconstruct(i)
            assert np.allclose(got, want, atol=1e-2), (m, i)  # id i holds uid i's vector
    for i in range(0, len(uids), 211):
        row = expected[uids[i]]
        assert meta.column("url")[i].as_py() == row["url"]
        assert meta.column("text")[i].as_py() == row["text"]

    recall = json.loads(open(os.path.join(out, "recall.json")).read())
    for m in ("image", "text"):
        for q in ("image_queries", "text_queries"):
            r = recall["indices"][m][q]
            assert r["queries"] == 100
            assert {"recall@1", "recall@10", "recall@100", "latency_p50_ms",
                    "latency_p99_ms"} <= set(r)
            assert r["recall@10"] >= 0.9
    params = json.loads(open(os.path.join(out, "index_params.json")).read())
    assert params["table_version"] == 1 and params["indices"]["image"]["reasons"]
    assert params["indices"]["image"]["nprobe"] >= 1


def test_rebuild_of_a_version_gives_same_order(spark, pairs_lake, tmp_path):
    lake, table = pairs_lake
    first = run_index(spark, _cfg(tmp_path / "a", table_version=0, ondisk_merge="always"), lake)
    # Different task layout and filter-equivalent SQL: the same ids must come out.
    second = run_index(spark, _cfg(tmp_path / "b", table_version=0, rows_per_part=400,
                                   filter="passes_filter = true"), lake)
    assert first["output"].endswith("pairs-v0")
    m1 = pq.read_table(os.path.join(first["output"], "metadata.parquet"))
    m2 = pq.read_table(os.path.join(second["output"], "metadata.parquet"))
    assert m1.equals(m2)
    v0 = _expected(table.slice(0, 1802), lambda r: r["passes_filter"])
    assert m1.num_rows == len(v0)  # version 0 only: the second shard is not there

    # The on-disk build answers like the in-memory one.
    disk = faiss.read_index(os.path.join(first["output"], "image.index"),
                            faiss.IO_FLAG_ONDISK_SAME_DIR)
    mem = faiss.read_index(os.path.join(second["output"], "image.index"))
    assert os.path.exists(os.path.join(first["output"], "image.ivfdata"))
    q = core.decode_embeddings(pa.array([v0[u]["image_embedding"] for u in list(v0)[:20]]), DIM)
    for idx in (disk, mem):
        faiss.extract_index_ivf(idx).nprobe = 1 << 20
    assert np.array_equal(disk.search(q, 5)[1], mem.search(q, 5)[1])


def test_filter_is_any_sql_predicate(spark, pairs_lake, tmp_path):
    lake, table = pairs_lake
    summary = run_index(spark, _cfg(tmp_path, filter="similarity > 0.3 AND width >= 300"), lake)
    expected = _expected(table, lambda r: r["similarity"] > 0.3 and r["width"] >= 300)
    meta = pq.read_table(os.path.join(summary["output"], "metadata.parquet"))
    assert set(meta.column("uid").to_pylist()) == set(expected)
