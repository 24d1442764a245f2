"""`laion-spark demo` end to end: every stage on the generated demo web, the tables agree with
each other, and a second run commits nothing (resume without duplicates across the pipeline)."""
from __future__ import annotations

from pathlib import Path

import pytest

from laion_spark.config import load_config
from laion_spark.demo.pipeline import run_demo
from laion_spark.job import JobContext

N_PAGES = 40


@pytest.fixture(scope="module")
def demo_run(spark, tmp_path_factory, demo_clip_dir):
    root = tmp_path_factory.mktemp("demo")
    cfg = load_config(None, [
        f"lake.root={root / 'lake'}",
        f"demo.out_dir={root / 'web'}",
        f"demo.clip_model_dir={demo_clip_dir}",
        f"index.output={root / 'indices'}",
    ])
    ctx = JobContext(cfg, _spark=spark)
    first = run_demo(ctx, n_pages=N_PAGES)
    versions = {t: ctx.lake.version(t) for t in ctx.lake.tables()}
    second = run_demo(ctx, n_pages=N_PAGES)
    return ctx, first, second, versions, root


def test_every_stage_ran(demo_run):
    ctx, first, _, _, _ = demo_run
    for stage in ("extract", "download", "score", "index"):
        assert isinstance(first[stage], dict), f"stage {stage}: {first[stage]}"
    assert {"candidates", "images", "pairs"} <= set(ctx.lake.tables())


def test_tables_agree(demo_run):
    ctx, _, _, _, _ = demo_run
    lake = ctx.lake
    candidates = lake.read("candidates")
    images = lake.read("images")
    pairs = lake.read("pairs")
    n_candidates = candidates.count()
    assert n_candidates > 50
    # every candidate has exactly one images row, success or not
    assert images.count() == n_candidates
    assert images.select("uid").distinct().count() == n_candidates
    assert images.join(candidates, "uid", "left_anti").count() == 0
    n_success = images.where("status = 'success'").count()
    assert 0 < n_success < n_candidates  # the demo web has failures by design
    # every successful download was scored once
    assert pairs.count() == n_success
    assert pairs.select("uid").distinct().count() == n_success
    kept = pairs.where("passes_filter").count()
    assert 0 < kept < n_success


def test_second_run_commits_nothing(demo_run):
    ctx, _, second, versions, _ = demo_run
    after = {t: ctx.lake.version(t) for t in ctx.lake.tables()}
    assert after == versions


def test_index_covers_kept_pairs(demo_run):
    ctx, first, _, _, root = demo_run
    out = Path(ctx.cfg.index.output)  # the index stage's prepare_demo puts it beside the demo web
    files = list(out.rglob("*.index"))
    assert files, "no faiss index written"
    import pyarrow.parquet as pq

    meta = sorted(out.rglob("metadata.parquet"))
    assert meta
    n_kept = ctx.lake.read("pairs").where("passes_filter").count()
    assert pq.read_metadata(meta[0]).num_rows == n_kept
