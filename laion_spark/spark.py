"""The one session builder and the one place that knows Spark versions apart (3.5 and 4.x).

`local[*]` when run by hand; whatever spark-submit gave otherwise. Delta's SQL extension is
detected (EMR, Dataproc, a cluster with the jars), never assumed: `lake.py` picks its backend from
`has_delta_extension`. A local session adds Delta itself when `scripts/setup-jars.sh` fetched the
jars for this pyspark into `.jars/spark-<major.minor>/` (or SparkConfig.jars_dir names a folder).

Other modules call the helpers here instead of version-specific APIs: `to_arrow_schema`,
`from_arrow_schema`, `dataframe_to_arrow` (DataFrame.toArrow is 4.x only), `dataframe_from_arrow`
(createDataFrame(pyarrow.Table) is 4.x only), `repartition_by_id` (DataFrame.repartitionById is
4.1+).
"""
from __future__ import annotations

import glob
import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

import pyspark
from pyspark.sql import DataFrame, SparkSession

from laion_spark.batches import DEFAULT_MAX_BATCH_BYTES
from laion_spark.config import SparkConfig

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
# Rows holding images: 8192 rows x 1 MB overflow Arrow's 2 GiB per column; bound bytes too.
ARROW_MAX_BYTES_PER_BATCH = DEFAULT_MAX_BATCH_BYTES
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
# Where scripts/setup-jars.sh puts the jars, beside the package (a checkout, not a wheel install).
JARS_ROOT = Path(__file__).resolve().parent.parent / ".jars"


@lru_cache(maxsize=1)
def spark_version() -> tuple[int, int]:
    """(major, minor) of the installed pyspark, e.g. (3, 5) or (4, 2)."""
    major, minor = pyspark.__version__.split(".")[:2]
    return int(major), int(minor)


def local_delta_jars(cfg: SparkConfig | None = None) -> Path | None:
    """The folder of Delta + hadoop-aws jars for this pyspark, or None when there is none.

    SparkConfig.jars_dir: "auto" looks in .jars/spark-<major.minor>/ beside the package, "" turns
    it off, anything else is the folder."""
    setting = "auto" if cfg is None else cfg.jars_dir
    if not setting:
        return None
    major, minor = spark_version()
    folder = JARS_ROOT / f"spark-{major}.{minor}" if setting == "auto" else Path(setting)
    if not glob.glob(str(folder / "delta-spark_*.jar")):
        if setting != "auto":
            raise FileNotFoundError(f"spark.jars_dir {folder} holds no delta-spark jar "
                                    f"(scripts/setup-jars.sh fetches them)")
        return None
    return folder


def delta_session_conf(jars: Path) -> dict[str, str]:
    """Session settings that put the jars on the class path and turn Delta on.

    extraClassPath, not spark.jars: the AWS SDK bundle is hundreds of MB and spark.jars would copy
    it into every executor's work folder; the class path reads it in place (same path on every
    host of a local or one-host standalone cluster)."""
    classpath = str(jars / "*")
    return {
        "spark.driver.extraClassPath": classpath,
        "spark.executor.extraClassPath": classpath,
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
    }


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
        jars = local_delta_jars(cfg)
        if jars is not None:
            for k, v in delta_session_conf(jars).items():
                builder = builder.config(k, v)
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
        "spark session: pyspark %s master=%s delta_extension=%s",
        pyspark.__version__,
        spark.sparkContext.master,
        has_delta_extension(spark),
    )
    return spark


def has_delta_extension(spark: SparkSession) -> bool:
    """True when the session was configured with Delta's SQL extension (and so has its jars)."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_EXTENSION in extensions


# ----------------------------------------------------------------- version-neutral helpers
def to_arrow_schema(spark_schema):
    """Spark schema -> Arrow schema with UTC timestamps and plain (not large) string/binary.

    Spark 4 takes `timezone` and `prefers_large_types`; 3.5 takes neither and always uses UTC."""
    from pyspark.sql.pandas.types import to_arrow_schema as _to_arrow

    if spark_version() >= (4, 0):
        return _to_arrow(spark_schema, timezone="UTC", prefers_large_types=False)
    return _to_arrow(spark_schema)


def from_arrow_schema(arrow_schema):
    """Arrow schema -> Spark schema; tz-less timestamps become TIMESTAMP_NTZ on every version
    (4.x's default; 3.5 would make them session-local TIMESTAMP)."""
    from pyspark.sql.pandas.types import from_arrow_schema as _from_arrow

    return _from_arrow(arrow_schema, prefer_timestamp_ntz=True)


def dataframe_to_arrow(df: DataFrame):
    """`df` collected to the driver as one pyarrow Table (DataFrame.toArrow on 4.x; the same
    Arrow collect path under toPandas on 3.5). Only for results that are small by construction."""
    import pyarrow as pa

    if hasattr(df, "toArrow"):
        return df.toArrow()
    batches = df._collect_as_arrow()
    schema = to_arrow_schema(df.schema)
    if not batches:
        return schema.empty_table()
    return pa.Table.from_batches(batches).cast(schema)


def dataframe_from_arrow(spark: SparkSession, table) -> DataFrame:
    """A pyarrow Table as a DataFrame: Spark 4 takes it as it is; 3.5 only through pandas, with
    the schema taken from Arrow (not inferred from pandas' object columns)."""
    if spark_version() >= (4, 0):
        return spark.createDataFrame(table)
    return spark.createDataFrame(table.to_pandas(), schema=from_arrow_schema(table.schema))


def repartition_by_id(df: DataFrame, n_partitions: int, partition_id) -> DataFrame:
    """One exchange that sends each row to partition `partition_id` (a column in [0, n)).

    Spark >= 4.1: repartitionById (no sampling job). Older: range partitioning, which is one small
    sampling job and gives the same grouping (rows of one id together, ids in order)."""
    n = max(1, n_partitions)
    if hasattr(df, "repartitionById"):
        return df.repartitionById(n, partition_id)
    return df.repartitionByRange(n, partition_id)
