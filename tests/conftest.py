"""Shared fixtures: one local Spark session for the whole run, a fresh lake per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = (REPO.parent / "shared" / "data" / "real").resolve()


@pytest.fixture(scope="session")
def spark():
    from laion_spark.config import SparkConfig
    from laion_spark.spark import build_spark_session

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = build_spark_session(
        SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="2g", log_level="ERROR",
                    app_name="laion-spark-tests")
    )
    yield session
    session.stop()


@pytest.fixture()
def lake(spark, tmp_path):
    from laion_spark.config import LakeConfig
    from laion_spark.lake import Lake

    return Lake(spark, LakeConfig(root=str(tmp_path / "lake")))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session (tests/s3_server.py): .endpoint,
    .make_bucket(name) -> "s3://name", .storage_options (delta-rs), .fsspec_options (s3fs),
    .spark_conf (spark.hadoop.fs.s3a.*)."""
    from s3_server import S3Server  # needs moto[server] (dev extra)

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/real: skip with a clear message where a clone has no ../shared."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real web-archive data not found at {REAL_DATA} (needs ../shared beside the repo)")
    return REAL_DATA


@pytest.fixture(scope="session")
def demo_clip_dir(tmp_path_factory) -> Path:
    """The demo CLIP, trained once per test session (about two minutes of CPU) and shared by every
    test that scores; LAION_SPARK_TEST_DEMO_CLIP names a folder to train into once and reuse."""
    from laion_spark.score.demo_model import train_demo_clip

    folder = os.environ.get("LAION_SPARK_TEST_DEMO_CLIP") or tmp_path_factory.mktemp("demo-clip")
    train_demo_clip(folder, seed=0)
    return Path(folder)
