"""Shared fixtures: one local Spark session for the whole run, a fresh lake per test.

The session gets Delta's jars when scripts/setup-jars.sh fetched them for this pyspark, so both
table backends can run in one session. LAION_LAKE_BACKEND=delta-rs|delta-spark|auto (default
auto: delta-spark when the jars are there) picks the backend of the `lake` fixture, so any Spark
test runs on either; `each_backend` runs a test on both."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = (REPO.parent / "shared" / "data" / "real").resolve()
LAKE_BACKENDS = ("delta-rs", "delta-spark")


def pytest_collection_modifyitems(config, items):
    """Every test that uses the Spark session (directly or through a fixture) is marked `spark`,
    so `-m spark` selects the Spark tests for the second pyspark's run in .ci/run. A test that
    runs Spark another way (spark-submit) marks itself with pytest.mark.spark."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


def requested_backend() -> str:
    backend = os.environ.get("LAION_LAKE_BACKEND", "auto") or "auto"
    if backend not in ("auto", *LAKE_BACKENDS):
        raise pytest.UsageError(f"LAION_LAKE_BACKEND must be auto, delta-rs or delta-spark, not {backend!r}")
    return backend


def require_backend(spark, backend: str) -> None:
    """delta-spark needs the session to have Delta; without the jars a developer's run skips
    those cases, while CI (CI=true, where the set-up fetched the jars) fails instead."""
    from laion_spark.spark import has_delta_extension

    if backend == "delta-spark" and not has_delta_extension(spark):
        msg = "no Delta jars for this pyspark: run scripts/setup-jars.sh (make setup does)"
        if os.environ.get("CI") or os.environ.get("LAION_LAKE_BACKEND") == "delta-spark":
            pytest.fail(msg)
        pytest.skip(msg)


def make_lake(spark, root: str, backend: str = "auto", storage_options: dict | None = None):
    from laion_spark.config import LakeConfig
    from laion_spark.lake import Lake

    require_backend(spark, backend)
    return Lake(spark, LakeConfig(root=root, backend=backend, storage_options=dict(storage_options or {})))


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
    """A fresh lake on the backend LAION_LAKE_BACKEND asks for (auto by default)."""
    return make_lake(spark, str(tmp_path / "lake"), requested_backend())


@pytest.fixture(params=LAKE_BACKENDS)
def each_backend(request, spark) -> str:
    """Runs the test once per table backend (delta-spark skipped without jars, except in CI)."""
    require_backend(spark, request.param)
    return request.param


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
