"""The one session builder. `local[*]` when run by hand; whatever spark-submit gave otherwise.

Delta's SQL extension is detected (EMR, Dataproc, a cluster with the jars), never assumed:
`lake.py` picks its backend from `has_delta_extension`.
"""
from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

from laion_spark.batches import DEFAULT_MAX_BATCH_BYTES
from laion_spark.config import SparkConfig

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
# Rows holding images: 8192 rows x 1 MB overflow Arrow's 2 GiB per column; bound bytes too.
ARROW_MAX_BYTES_PER_BATCH = DEFAULT_MAX_BATCH_BYTES


def _launched_by_spark_submit() -> bool:
    """spark-submit sets spark.master in the JVM conf before Python runs."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or os.environ.get("SPARK_ENV_LOADED") == "1"


def build_spark_session(cfg: SparkConfig | None = None) -> SparkSession:
    """Get or create the session with Arrow on, TIMESTAMP_MICROS Parquet and quiet logs."""
    cfg = cfg or SparkConfig()
    active = SparkSession.getActiveSession()
    builder = SparkSession.builder.appName(cfg.app_name)
    if active is None and not _launched_by_spark_submit():
        builder = builder.master(cfg.master).config("spark.driver.memory", cfg.driver_memory)
        if cfg.master.startswith("local"):
            # A laptop/CI run talks to itself only: bind the driver to loopback, not eth0.
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            builder = builder.config("spark.driver.host", "127.0.0.1").config(
                "spark.driver.bindAddress", "127.0.0.1")
        # Executors are forked Pythons; make them use the driver's interpreter (the venv).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "8192",
        "spark.sql.execution.arrow.maxBytesPerBatch": str(ARROW_MAX_BYTES_PER_BATCH),
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.python.worker.reuse": "true",
    }
    conf.update(cfg.extra_conf)
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    log.info(
        "spark session: master=%s delta_extension=%s",
        spark.sparkContext.master,
        has_delta_extension(spark),
    )
    return spark


def has_delta_extension(spark: SparkSession) -> bool:
    """True when the session was configured with Delta's SQL extension (and so has its jars)."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_EXTENSION in extensions


def configure_logging(level: str = "INFO") -> None:
    """Concise driver logs: time, stage module, message."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "urllib3", "PIL", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
