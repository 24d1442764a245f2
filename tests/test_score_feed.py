"""score keeps its device fed: decode threads default to the executor's cores per task, and a model
bundle above `score.broadcast_max_bytes` is loaded by each executor process from its path (a
folder, or object storage through the per-host cache) instead of travelling through the driver."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
from test_score import _images_batch, tiny_clip_dir  # noqa: F401  (fixture)

from laion_spark.config import Config, ScoreConfig, load_config
from laion_spark.score import models as score_models
from laion_spark.score.scorer import (ScoreSettings, auto_preprocess_threads, resolve_preprocess_threads,
                                      score_record_batches)


@pytest.mark.parametrize("cores,task_cpus,gpus_exec,gpus_task,want", [
    (16, 1, 0, 0, 1),    # CPU executor: 16 one-core tasks at once, one decode thread each
    (16, 4, 0, 0, 4),    # spark.task.cpus=4: four threads per task
    (16, 1, 1, 1, 16),   # one GPU per executor: the GPU's task gets every core to decode for it
    (16, 1, 2, 1, 8),    # two GPUs: eight cores feed each
    (8, 1, 1, 0.5, 4),   # two tasks share a GPU
])
def test_auto_threads_follow_the_executor(cores, task_cpus, gpus_exec, gpus_task, want):
    assert auto_preprocess_threads(cores, task_cpus, gpus_exec, gpus_task) == want


def test_threads_setting():
    assert load_config(None, ["score.preprocess_threads=6"]).score.preprocess_threads == 6
    assert Config().score.preprocess_threads == "auto"
    assert resolve_preprocess_threads(3) == 3
    assert resolve_preprocess_threads("auto", executor_cores=12, task_cpus=3) == 3
    with pytest.raises(ValueError, match="preprocess_threads"):
        resolve_preprocess_threads("many")


def _embed(bundle, batch, cfg):
    models = score_models.get_models(bundle.key, lambda: bundle, "cpu", "float32")
    out = pa.Table.from_batches(list(score_record_batches([batch], models, ScoreSettings.from_config(cfg))))
    return np.stack([np.frombuffer(b, "<f2") for b in out.column("image_embedding").to_pylist()])


def test_big_bundle_is_loaded_from_its_path(tiny_clip_dir, tmp_path, s3_server):  # noqa: F811
    import fsspec

    small = ScoreConfig(clip_model=tiny_clip_dir, device="cpu", dtype="float32", batch_size=4)
    by_bytes = score_models.bundle_from_config(small)
    assert by_bytes.source == "broadcast" and by_bytes.n_bytes > 100_000

    big = ScoreConfig(clip_model=tiny_clip_dir, device="cpu", dtype="float32", batch_size=4,
                      broadcast_max_bytes=by_bytes.n_bytes - 1)
    local = score_models.bundle_from_config(big)
    assert local.source == "path" and local.n_bytes == 0 and len(pickle.dumps(local)) < 4096
    batch = _images_batch(5)
    want = _embed(by_bytes, batch, small)
    np.testing.assert_array_equal(_embed(local, batch, big), want)

    # Object storage: listed on the driver, copied once into the host's cache by the executor.
    bucket = s3_server.make_bucket("models")
    fs = fsspec.filesystem("s3", **s3_server.fsspec_options)
    for name in os.listdir(tiny_clip_dir):
        fs.put_file(os.path.join(tiny_clip_dir, name), f"{bucket[5:]}/tiny/{name}")
    remote = ScoreConfig(clip_model=f"{bucket}/tiny", device="cpu", dtype="float32", batch_size=4,
                         broadcast_max_bytes=1, model_cache_dir=str(tmp_path / "cache"))
    from_s3 = score_models.bundle_from_config(remote, s3_server.fsspec_options)
    assert from_s3.source == "path" and from_s3.n_bytes == 0
    np.testing.assert_array_equal(_embed(from_s3, batch, remote), want)
    cached = os.listdir(tmp_path / "cache")
    assert cached == [f"{from_s3.key}-clip"]
    assert sorted(os.listdir(tmp_path / "cache" / cached[0])) == sorted(
        n for n in os.listdir(tiny_clip_dir) if n.endswith(score_models._MODEL_FILE_SUFFIXES))


def test_spark_score_loads_big_bundle_from_path_once_per_process(spark, lake, tiny_clip_dir, tmp_path):  # noqa: F811
    from laion_spark.score.job import run_score

    rows = _images_batch(12).to_pylist()
    for i, r in enumerate(rows):
        r["shard"] = i % 3
    lake.append("images", spark.createDataFrame(pa.Table.from_pylist(rows).to_pandas()), stage="download",
                units=["0", "1", "2"])
    cfg = Config()
    cfg.score.clip_model = tiny_clip_dir
    cfg.score.device, cfg.score.dtype, cfg.score.batch_size = "cpu", "float32", 4
    cfg.score.broadcast_max_bytes = 1  # every real model is "big" here
    cfg.score.load_log_dir = str(tmp_path / "loads")
    cfg.score.partitions = 2
    summary = run_score(spark, cfg, lake)
    assert summary["rows"] == 12
    lines = [ln for f in (tmp_path / "loads").glob("loads-*.txt") for ln in f.read_text().splitlines()]
    assert lines and all(ln.endswith(" path") for ln in lines)
    per_process = [len(f.read_text().splitlines()) for f in (tmp_path / "loads").glob("loads-*.txt")]
    assert all(n == 1 for n in per_process), per_process
