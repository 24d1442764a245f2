"""The table layer: the only module that reads or writes Delta tables.

Two backends behind one API (read, append, overwrite, version, idempotent commit):

* ``delta-spark``: the session has Delta's SQL extension (EMR >= 6.9, Dataproc 2.2, jars on the
  classpath), so Spark reads and writes ``format("delta")`` itself.
* ``delta-rs``: no Delta jars (no Maven here). Spark writes plain Parquet into a fresh folder
  inside the table; the driver reads the Parquet footers for per-file stats and commits the files
  with ``deltalake`` (AddAction + create_table_with_add_actions / create_write_transaction).

Idempotence, the same on both backends and never from commit history (Delta deletes old commit
files at checkpoints, ``delta.logRetentionDuration``): a commit may carry a Delta application
transaction id (``txn``: delta-spark's ``txnAppId``/``txnVersion`` writer options, delta-rs app
transactions), kept in every checkpoint, so a second commit with the same id is a no-op. The wave
runner (``waves.py``) gives each wave's data commit one such id, records the wave's units in a
small intent file first (:meth:`Lake.begin_wave`) and its unit rows in a ``<stage>_units`` table
last; :meth:`Lake.done_units` reads that table once per run. A crash between the two commits is
redone with the same wave id: the data commit is skipped, the unit rows land. Legacy per-unit
``units=`` commits keep working (delta-rs: one txn per unit; delta-spark: one txn per commit).
A crash before a commit leaves only unreferenced Parquet files, never rows.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession

from laion_spark.config import LakeConfig
from laion_spark.spark import has_delta_extension

log = logging.getLogger(__name__)

UNIT_VERSION = 1
_STATS_STRING_MAX = 64


class LakeError(RuntimeError):
    """A table operation that cannot go ahead; the message names the table."""


class SchemaMismatchError(LakeError):
    """Appending rows whose columns or types differ from the table's."""


@dataclass
class CommitResult:
    """What a write did: the new version (None when nothing was committed) and how much."""

    table: str
    version: Optional[int]
    files: int
    rows: int
    skipped_units: list[str]
    committed_units: list[str]


def unit_app_id(stage: str, unit: str) -> str:
    """A stable, short Delta appId for a unit of work (paths can be long and hold any byte)."""
    digest = hashlib.sha1(unit.encode("utf-8")).hexdigest()[:20]
    return f"{stage}:{digest}"


def fsspec_options(uri: str, storage_options: dict[str, str]) -> dict:
    """delta-rs storage options -> fsspec keyword arguments for the same store.

    s3/s3a: AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION become s3fs's
    key/secret/token/client_kwargs (absent keys: s3fs's own chain, e.g. an instance role). Other
    schemes get the options unchanged (gcsfs and friends take their own names)."""
    scheme = urlparse(uri).scheme
    if scheme not in ("s3", "s3a"):
        return dict(storage_options) if not _is_local(uri) else {}
    o = {k.upper(): v for k, v in storage_options.items()}
    out: dict = {}
    for key, name in (("AWS_ACCESS_KEY_ID", "key"), ("AWS_SECRET_ACCESS_KEY", "secret"),
                      ("AWS_SESSION_TOKEN", "token")):
        if o.get(key):
            out[name] = o[key]
    client = {}
    if o.get("AWS_ENDPOINT_URL") or o.get("AWS_ENDPOINT"):
        client["endpoint_url"] = o.get("AWS_ENDPOINT_URL") or o.get("AWS_ENDPOINT")
    if o.get("AWS_REGION") or o.get("AWS_DEFAULT_REGION"):
        client["region_name"] = o.get("AWS_REGION") or o.get("AWS_DEFAULT_REGION")
    if client:
        out["client_kwargs"] = client
    return out


def _batch_app_id(stage: str, units: Iterable[str]) -> str:
    return _batch_app_id_of(stage, [unit_app_id(stage, u) for u in dict.fromkeys(units)])


def _batch_app_id_of(stage: str, app_ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(app_ids)).encode()).hexdigest()[:20]
    return f"{stage}:batch:{digest}"


def wave_app_id(stage: str, wave_id: str) -> str:
    """The Delta app id of one wave's commit (both backends)."""
    return f"{stage}:wave:{wave_id}"


def one_row_per_key(df: DataFrame, key: str, order: Sequence[str]) -> DataFrame:
    """One row per `key` value: the row with the smallest `order` struct (a re-run picks the same
    row). groupBy + min_by, not a window: Spark aggregates map-side first, so a value repeated
    a million times costs one row per task in the shuffle, and no column is sorted."""
    from pyspark.sql import functions as F

    cols = [c for c in df.columns if c != key]
    if not cols:
        return df.select(key).distinct()
    return (df.groupBy(key)
            .agg(F.min_by(F.struct(*cols), F.struct(*order)).alias("_row"))
            .select(key, *[F.col(f"_row.{c}").alias(c) for c in cols])
            .select(*df.columns))


def _files_matching(table, table_path: str, where_in: dict[str, list]) -> list[str]:
    """URIs of the live files whose min/max stats may hold one of the values of every column
    (a file without stats for a column is kept: a missing bound never drops live rows)."""
    import bisect

    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    wanted = {c: sorted(v) for c, v in where_in.items()}
    out = []
    for a in actions:
        keep = True
        for c, values in wanted.items():
            lo, hi = a.get(f"min.{c}"), a.get(f"max.{c}")
            if lo is None or hi is None:
                if a.get(f"null_count.{c}") is not None and a.get(f"null_count.{c}") == a.get("num_records"):
                    keep = False  # all null: no value can match
                continue
            i = bisect.bisect_left(values, lo)
            if i >= len(values) or values[i] > hi:
                keep = False
                break
        if keep:
            p = a["path"]
            out.append(p if "://" in p or p.startswith("/") else f"{table_path}/{unquote(p)}")
    return out


def _is_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1)  # windows drive letters


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    if uri.startswith("file:"):
        return unquote(uri[5:])
    return uri


class Lake:
    """All the tables under one root folder (local path, s3://, gs://)."""

    def __init__(self, spark: SparkSession, cfg: LakeConfig | None = None):
        self.spark = spark
        self.cfg = cfg or LakeConfig()
        root = self.cfg.root
        if _is_local(root):
            root = os.path.abspath(_local_path(root))
            os.makedirs(root, exist_ok=True)
        self.root = root.rstrip("/")
        backend = self.cfg.backend
        if backend == "auto":
            # LAION_LAKE_BACKEND (delta-rs | delta-spark) overrides auto: runs a job or the tests
            # on the other backend without editing a config.
            backend = os.environ.get("LAION_LAKE_BACKEND", "") or "auto"
        if backend == "auto":
            backend = "delta-spark" if has_delta_extension(spark) else "delta-rs"
        if backend not in ("delta-spark", "delta-rs"):
            raise LakeError(f"lake.backend must be auto, delta-spark or delta-rs, got {backend!r}")
        self.backend = backend
        self.storage_options = dict(self.cfg.storage_options)

    # ----------------------------------------------------------------- paths and discovery
    def filesystem(self, uri: str):
        """(fsspec filesystem, path) for a URI in the lake, with the lake's credentials: the
        delta-rs storage options translated for s3fs (one set of settings for both)."""
        import fsspec

        return fsspec.core.url_to_fs(uri, **fsspec_options(uri, self.storage_options))

    def table_path(self, name: str) -> str:
        if not name.replace("_", "").isalnum():
            raise LakeError(f"table name {name!r} must be letters, digits and underscores")
        return f"{self.root}/{name}"

    def _delta_table(self, name: str, version: int | None = None):
        from deltalake import DeltaTable

        path = self.table_path(name)
        try:
            return DeltaTable(path, version=version, storage_options=self.storage_options or None)
        except Exception as exc:  # TableNotFoundError and friends
            raise LakeError(f"table '{name}' at {path}: {exc}") from exc

    def exists(self, name: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(
            self.table_path(name), storage_options=self.storage_options or None
        )

    def tables(self) -> list[str]:
        """Names of the Delta tables directly under the root."""
        if _is_local(self.root):
            if not os.path.isdir(self.root):
                return []
            names = [
                d
                for d in sorted(os.listdir(self.root))
                if os.path.isdir(os.path.join(self.root, d, "_delta_log"))
            ]
        else:
            fs, path = self.filesystem(self.root)
            names = sorted(
                os.path.basename(p.rstrip("/"))
                for p in fs.ls(path, detail=False)
                if fs.exists(f"{p}/_delta_log")
            )
        return [n for n in names if n.replace("_", "").isalnum()]

    # ----------------------------------------------------------------- reads
    def version(self, name: str) -> Optional[int]:
        """Current version of the table, or None when it does not exist."""
        if not self.exists(name):
            return None
        return self._delta_table(name).version()

    def arrow_schema(self, name: str, version: int | None = None) -> pa.Schema:
        return pa.schema(self._delta_table(name, version).schema().to_arrow())

    def read(self, name: str, version: int | None = None, *,
             where_in: dict[str, Sequence] | None = None, as_parquet: bool = False) -> DataFrame:
        """The table as a Spark DataFrame (optionally at an older version: time travel).

        `where_in={"shard": [3, 4]}` keeps rows whose column is one of the values, and reads only
        the files whose Delta min/max stats can hold one (delta-spark: Delta's own data skipping
        on the bare column; delta-rs: the files are chosen here from the `add` stats). Give values
        of the column's own type: a cast column defeats skipping and Parquet pushdown.

        `as_parquet=True` reads the version's files (listed from the Delta log) with Spark's plain
        Parquet reader on either backend: only it exposes `_metadata.row_index`, which the index
        job's ids need (Delta's reader has file_path but no row_index). Refused on tables with
        deletion vectors, whose deleted rows a plain read would bring back."""
        from pyspark.sql import functions as F

        where_in = {k: list(v) for k, v in (where_in or {}).items()}
        if as_parquet:
            features = self._delta_table(name, version).protocol().reader_features or []
            if "deletionVectors" in features:
                raise LakeError(f"table '{name}' uses deletion vectors: a plain Parquet read "
                                "of its files would return deleted rows")
        if self.backend == "delta-spark" and not as_parquet:
            reader = self.spark.read.format("delta")
            if version is not None:
                reader = reader.option("versionAsOf", version)
            df = reader.load(self.table_path(name))
        else:
            table = self._delta_table(name, version)
            schema = pa.schema(table.schema().to_arrow())
            spark_schema = _spark_schema_from_arrow(schema)
            uris = _files_matching(table, self.table_path(name), where_in) if where_in else table.file_uris()
            if not uris:
                return self.spark.createDataFrame([], spark_schema)
            df = self.spark.read.schema(spark_schema).parquet(*uris)
        for column, values in where_in.items():
            df = df.filter(F.col(column).isin(values))
        return df

    def unique_key(self, name: str) -> Optional[tuple[str, list[str]]]:
        """(key column, order columns) when table `name` keeps one current row per key
        (`lake.unique_keys`), else None."""
        spec = list(self.cfg.unique_keys.get(name, []))
        if not spec:
            return None
        missing = sorted(set(spec) - set(self.arrow_schema(name).names)) if self.exists(name) else []
        if missing:
            log.warning("table '%s': unique key columns %s missing, key not applied", name, missing)
            return None
        return spec[0], spec[1:]

    def read_current(self, name: str, columns: Sequence[str] | None = None) -> DataFrame:
        """The table with one row per unique key (`lake.unique_keys[name]`: key, then the order
        that picks the row): what every reader that needs "one row per uid" uses. Appends may
        repeat a key (extract does not anti-join each wave against the whole table);
        `maintain` removes the repeats, after which this is the table itself plus a shuffle.
        `columns`: the columns to keep (the key and order columns are read as well)."""
        df = self.read(name)
        spec = self.unique_key(name)
        if spec is None:
            return df.select(*columns) if columns else df
        key, order = spec
        if columns:
            keep = list(dict.fromkeys([key, *columns, *order]))
            df = df.select(*keep)
        out = one_row_per_key(df, key, order)
        return out.select(*columns) if columns else out

    def read_arrow(self, name: str, version: int | None = None, columns: list[str] | None = None,
                   filter=None) -> pa.Table:
        """The table as Arrow, with no Spark: for GPU scoring/index machines and tests."""
        ds = self._delta_table(name, version).to_pyarrow_dataset()
        return ds.to_table(columns=columns, filter=filter)

    def read_arrow_where(self, name: str, columns: list[str], where_in: dict[str, Sequence]) -> pa.Table:
        """The rows whose columns hold one of the values, as Arrow, no Spark: only the files whose
        min/max stats can hold a value are opened (a few rows of a units table per wave). Not
        `to_pyarrow_dataset(filter=)`: delta-rs turns a missing bound into `>= null`, which
        prunes the file (long strings have no bounds here)."""
        import fsspec
        import pyarrow.compute as pc

        where_in = {k: list(v) for k, v in where_in.items()}
        table = self._delta_table(name)
        schema = pa.schema(table.schema().to_arrow())
        want = list(dict.fromkeys([*columns, *where_in]))
        parts = []
        for uri in _files_matching(table, self.table_path(name), where_in):
            fs, p = self.filesystem(uri)
            with fs.open(p, "rb") as fh:
                t = pq.read_table(fh, columns=want)
            mask = None
            for c, values in where_in.items():
                m = pc.is_in(t.column(c), value_set=pa.array(values, type=t.schema.field(c).type))
                mask = m if mask is None else pc.and_(mask, m)
            parts.append(t.filter(mask).select(columns))
        if not parts:
            return pa.table({c: pa.array([], type=_normalise_arrow_type(schema.field(c).type))
                             for c in columns})
        return pa.concat_tables(parts, promote_options="permissive")

    def arrow_dataset(self, name: str, version: int | None = None):
        return self._delta_table(name, version).to_pyarrow_dataset()

    def history(self, name: str) -> list[dict]:
        return self._delta_table(name).history()

    def file_stats(self, name: str) -> list[dict]:
        """The `add` actions' stats of the live files (for tests and file-skipping checks)."""
        t = self._delta_table(name)
        actions = t.get_add_actions(flatten=False)
        batch = pa.table(actions) if not isinstance(actions, pa.Table) else actions
        return batch.to_pylist()

    # ----------------------------------------------------------------- idempotence
    def committed_units(self, name: str, stage: str, units: Iterable[str]) -> set[str]:
        """Which of `units` are already committed to table `name` (by a run of `stage`)."""
        units = list(units)
        if not units or not self.exists(name):
            return set()
        table = self._delta_table(name)
        # Legacy `units=` commits (the stages use waves: `<stage>_units` tables + one txn per
        # wave). A txn per unit on both backends (delta-rs; delta-spark's one-unit commits), read
        # from the snapshot. delta-spark's multi-unit commits carry one txn, so their units are
        # found in the commits' userMetadata: a history read, which log cleanup trims; no stage
        # depends on it.
        done = {u for u in units
                if (table.transaction_version(unit_app_id(stage, u)) or 0) >= UNIT_VERSION}
        if len(units) > 1 and len(done) < len(units):
            if (table.transaction_version(_batch_app_id(stage, units)) or 0) >= UNIT_VERSION:
                return set(units)
        wanted = {unit_app_id(stage, u): u for u in units if u not in done}
        if not wanted:
            return done
        for entry in table.history():
            meta = entry.get("userMetadata")
            if not meta:
                continue
            try:
                ids = json.loads(meta).get("units", [])
            except (ValueError, AttributeError):
                continue
            done.update(wanted[i] for i in ids if i in wanted)
        return done

    def transaction_version(self, name: str, app_id: str) -> Optional[int]:
        """The version of Delta app transaction `app_id` in table `name` (None: never committed).
        Read from the snapshot (checkpoint + newer commits), so log cleanup does not forget it."""
        if not self.exists(name):
            return None
        return self._delta_table(name).transaction_version(app_id)

    def done_units(self, table: str, column: str) -> set[str]:
        """The unit ids (as strings) of a `<stage>_units` table: read once per run, one column."""
        if not self.exists(table):
            return set()
        col = self.read_arrow(table, columns=[column]).column(column)
        return {str(v) for v in col.to_pylist() if v is not None}

    # ----------------------------------------------------------------- wave intents
    def _waves_dir(self, stage: str) -> str:
        return f"{self.root}/_waves/{stage}"

    def begin_wave(self, stage: str, wave_id: str, units: list[str]) -> None:
        """Record a wave's units before its first commit, so a crash between its data commit and
        its units commit is redone with the same wave id (and so skipped by the txn)."""
        fs, p = self.filesystem(f"{self._waves_dir(stage)}/{wave_id}.json")
        fs.makedirs(os.path.dirname(p), exist_ok=True)
        with fs.open(p, "w") as fh:
            json.dump({"wave_id": wave_id, "units": units}, fh)

    def end_wave(self, stage: str, wave_id: str) -> None:
        """Drop the intent of a wave whose unit rows are committed."""
        fs, p = self.filesystem(f"{self._waves_dir(stage)}/{wave_id}.json")
        if fs.exists(p):
            fs.rm(p)

    def open_waves(self, stage: str) -> list[tuple[str, list[str]]]:
        """Intents left by a crashed run: (wave id, units), oldest first. Holds at most a few
        entries (each completed wave removes its own)."""
        fs, p = self.filesystem(self._waves_dir(stage))
        if not fs.exists(p):
            return []
        out = []
        for f in sorted(fs.ls(p, detail=False)):
            if f.endswith(".json"):
                with fs.open(f, "r") as fh:
                    d = json.load(fh)
                out.append((d["wave_id"], [str(u) for u in d["units"]]))
        return out

    def pending_units(self, name: str, stage: str, units: Iterable[str]) -> list[str]:
        """`units` minus those already committed: what a (re-)run still has to do."""
        units = list(dict.fromkeys(units))
        done = self.committed_units(name, stage, units)
        return [u for u in units if u not in done]

    # ----------------------------------------------------------------- writes
    def append(self, name: str, df: DataFrame, *, stage: str = "laion-spark",
               units: Iterable[str] = (), metadata: dict | None = None,
               compression: str | None = None, txn: str | None = None) -> CommitResult:
        """Add `df`'s rows; with `units`, a unit already committed makes this commit a no-op;
        with `txn` (a wave's app id), a txn already in the table does the same.

        `compression`: the Parquet codec (default zstd; e.g. snappy for already-compressed bytes)."""
        return self._write(name, df, "append", stage, list(units), metadata, compression, txn)

    def overwrite(self, name: str, df: DataFrame, *, stage: str = "laion-spark",
                  units: Iterable[str] = (), metadata: dict | None = None,
                  compression: str | None = None, expect_version: int | None = None) -> CommitResult:
        """Replace the table's rows with `df`'s (old files stay until VACUUM, for time travel).

        `expect_version`: `df` was computed from that version of this table; the commit removes
        that version's files only (delta-rs: a file a concurrent append added stays live), and
        is refused with a LakeError when the table has moved on by the time the files are written
        (delta-spark removes the files of the version it commits on)."""
        return self._write(name, df, "overwrite", stage, list(units), metadata, compression,
                           expect_version=expect_version)

    def _write(self, name: str, df: DataFrame, mode: str, stage: str, units: list[str],
               metadata: dict | None, compression: str | None = None,
               txn: str | None = None, expect_version: int | None = None) -> CommitResult:
        started = time.time()
        if txn and (self.transaction_version(name, txn) or 0) >= UNIT_VERSION:
            log.info("%s: txn %s already committed, nothing to do", name, txn)
            return CommitResult(name, None, 0, 0, list(units), [])
        if units:
            already = self.committed_units(name, stage, units)
            if already:
                if len(already) != len(set(units)):
                    raise LakeError(
                        f"table '{name}': {len(already)} of {len(set(units))} units of this commit "
                        f"are already committed; split the work by pending_units() first"
                    )
                log.info("%s: all %d units already committed, nothing to do", name, len(already))
                return CommitResult(name, None, 0, 0, sorted(already), [])
        if self.exists(name) and mode == "append":
            self._check_schema(name, df)
        app_ids = [unit_app_id(stage, u) for u in dict.fromkeys(units)]
        if self.backend == "delta-spark":
            # One txn per delta-spark write: the wave's id, else the unit's, else the unit set's.
            app_id = txn or (app_ids[0] if len(app_ids) == 1 else
                             _batch_app_id_of(stage, app_ids) if app_ids else None)
            if expect_version is not None and self.version(name) != expect_version:
                raise LakeError(f"table '{name}' moved past version {expect_version} while this "
                                f"{mode} was prepared; nothing committed, run it again")
            result = self._write_delta_spark(name, df, mode, app_id, metadata, compression,
                                             unit_ids=app_ids if len(app_ids) > 1 else None)
        else:
            result = self._write_delta_rs(name, df, mode, app_ids + ([txn] if txn else []),
                                          metadata, compression, expect_version)
        result.committed_units = list(dict.fromkeys(units))
        log.info(
            "%s: %s %d rows in %d files -> version %s (%.1fs)",
            name, mode, result.rows, result.files, result.version, time.time() - started,
        )
        return result

    def _check_schema(self, name: str, df: DataFrame) -> None:
        table_schema = self.arrow_schema(name)
        incoming = _arrow_schema_from_spark(df.schema)
        want = {f.name: f.type for f in table_schema}
        got = {f.name: f.type for f in incoming}
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        changed = sorted(
            f"{k} ({want[k]} in table, {got[k]} in rows)"
            for k in set(want) & set(got)
            if not _same_type(want[k], got[k])
        )
        if missing or extra or changed:
            parts = []
            if missing:
                parts.append(f"missing columns {missing}")
            if extra:
                parts.append(f"unknown columns {extra}")
            if changed:
                parts.append(f"type changes {changed}")
            raise SchemaMismatchError(
                f"cannot append to table '{name}' ({self.table_path(name)}): " + "; ".join(parts)
            )

    def _write_delta_spark(self, name, df, mode, app_id, metadata, compression=None,
                           unit_ids: list[str] | None = None) -> CommitResult:
        writer = df.write.format("delta").mode(mode)
        if compression:
            writer = writer.option("compression", compression)
        user_meta = dict(metadata or {})
        if unit_ids:  # legacy multi-unit commit: its units, for committed_units
            user_meta["units"] = unit_ids
        if app_id:
            writer = writer.option("txnAppId", app_id).option("txnVersion", UNIT_VERSION)
        if user_meta:
            writer = writer.option("userMetadata", json.dumps(user_meta))
        writer.save(self.table_path(name))
        table = self._delta_table(name)
        last = table.history(1)[0]
        metrics = last.get("operationMetrics") or {}
        return CommitResult(
            name, table.version(), int(metrics.get("numFiles", 0) or 0),
            int(metrics.get("numOutputRows", 0) or 0), [], [],
        )

    def _write_delta_rs(self, name, df, mode, app_ids, metadata, compression=None,
                        expect_version: int | None = None) -> CommitResult:
        from deltalake import CommitProperties, DeltaTable, Schema, Transaction
        from deltalake.transaction import AddAction, create_table_with_add_actions

        path = self.table_path(name)
        batch_dir = f"part-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        staging = f"{path}/{batch_dir}"
        df.write.mode("errorifexists").option("compression", compression or "zstd").parquet(staging)
        files = self._list_parquet(staging)
        adds = self._add_actions(path, files)
        rows = sum(json.loads(a.stats).get("numRecords", 0) for a in adds)
        arrow_schema = _arrow_schema_from_spark(df.schema)
        props = CommitProperties(
            custom_metadata={k: (v if isinstance(v, str) else json.dumps(v))
                             for k, v in (metadata or {}).items()} or None,
            app_transactions=[
                Transaction(app_id=a, version=UNIT_VERSION, last_updated=int(time.time() * 1000))
                for a in app_ids
            ] or None,
            max_commit_retries=20,
        )
        so = self.storage_options or None
        if not DeltaTable.is_deltatable(path, storage_options=so):
            create_table_with_add_actions(
                path, Schema.from_arrow(arrow_schema), adds, mode="append",
                storage_options=so, commit_properties=props,
            )
        else:
            table = DeltaTable(path, storage_options=so)
            if expect_version is not None:
                if table.version() != expect_version:
                    raise LakeError(f"table '{name}' moved past version {expect_version} while this "
                                    f"{mode} was prepared; nothing committed, run it again")
                table = DeltaTable(path, version=expect_version, storage_options=so)
            table.create_write_transaction(
                adds, mode, Schema.from_arrow(arrow_schema), commit_properties=props,
            )
        version = DeltaTable(path, storage_options=so).version()
        return CommitResult(name, version, len(adds), rows, [], [])

    def _list_parquet(self, staging: str) -> list[str]:
        if _is_local(staging):
            out = []
            for dirpath, _, names in os.walk(_local_path(staging)):
                out.extend(os.path.join(dirpath, n) for n in names if n.endswith(".parquet"))
            return sorted(out)
        fs, p = self.filesystem(staging)
        proto = staging.split("://", 1)[0]
        return sorted(f"{proto}://{f}" for f in fs.find(p) if f.endswith(".parquet"))

    def _add_actions(self, table_path: str, files: list[str]) -> list:
        from deltalake.transaction import AddAction

        def one(f: str):
            if _is_local(f):
                size = os.path.getsize(f)
                mtime = int(os.path.getmtime(f) * 1000)
                meta = pq.read_metadata(f)
            else:
                fs, p = self.filesystem(f)
                info = fs.info(p)
                size = int(info["size"])
                mtime = int(time.time() * 1000)
                with fs.open(p, "rb") as fh:
                    meta = pq.read_metadata(fh)
            rel = os.path.relpath(f, table_path) if _is_local(f) else f[len(table_path) + 1:]
            return AddAction(rel, size, {}, mtime, True, json.dumps(parquet_file_stats(meta)))

        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(one, files))

    # ----------------------------------------------------------------- maintenance
    # Used by `laion-spark maintain` (laion_spark/maintain.py). Each method leaves the rows of the
    # table unchanged: compaction rewrites files, vacuum and staging clean-up only delete files no
    # version within the retention window references.
    def table_summary(self, name: str) -> dict:
        """Live files, rows and bytes of the current version (from the log, no data read)."""
        stats = self.file_stats(name)
        rows = sum(int(s.get("num_records") or 0) for s in stats)
        size = sum(int(s.get("size_bytes") or 0) for s in stats)
        return {"version": self.version(name), "files": len(stats), "rows": rows, "bytes": size,
                "avg_row_bytes": (size / rows) if rows else 0.0}

    def target_file_bytes(self, name: str) -> int:
        """`lake.target_file_rows` rows of this table's average (compressed) size, capped by
        `lake.max_file_bytes`: 250k candidates rows is ~20 MB, 250k images rows would be GBs."""
        avg = self.table_summary(name)["avg_row_bytes"] or 1.0
        cap = self.cfg.max_file_bytes
        return int(max(min(1 << 20, cap), min(cap, self.cfg.target_file_rows * avg)))

    def compact(self, name: str, *, target_bytes: int | None = None,
                cluster_columns: list[str] | None = None, dry_run: bool = False) -> dict:
        """Bin-pack small files toward `target_bytes` (or z-order them by `cluster_columns`).

        Z-order rewrites every file of the table (delta-rs and delta-spark alike), compaction only
        the files below the target. `dry_run` reports the small files without writing."""
        target = int(target_bytes or self.target_file_bytes(name))
        stats = self.file_stats(name)
        small = [s for s in stats if int(s.get("size_bytes") or 0) < target]
        out = {"target_bytes": target, "files_before": len(stats), "small_files": len(small),
               "cluster_columns": list(cluster_columns or []), "files_added": 0, "files_removed": 0}
        if dry_run or len(small) < 2:
            return out
        if self.backend == "delta-spark":
            spark_conf = self.spark.conf
            spark_conf.set("spark.databricks.delta.optimize.maxFileSize", str(target))
            sql = f"OPTIMIZE delta.`{self.table_path(name)}`"
            if cluster_columns:
                sql += " ZORDER BY (" + ", ".join(f"`{c}`" for c in cluster_columns) + ")"
            row = self.spark.sql(sql).collect()[0]
            metrics = row["metrics"].asDict() if "metrics" in row.__fields__ else {}
            out["files_added"] = int(metrics.get("numFilesAdded", 0) or 0)
            out["files_removed"] = int(metrics.get("numFilesRemoved", 0) or 0)
            return out
        from deltalake import WriterProperties

        table = self._delta_table(name)
        # Keep the table's codec (zstd, snappy for images): delta-rs defaults to snappy, which
        # would make the byte target mean fewer rows per file than the Spark-written files.
        codec, ratio = self._codec(name, stats[0]["path"])
        kw = dict(target_size=target, max_concurrent_tasks=os.cpu_count(),
                  writer_properties=WriterProperties(compression=codec))
        if cluster_columns:
            # delta-rs's z-order cuts files by uncompressed bytes (compact by file sizes): scale
            # the target by the table's compression ratio so both give ~target_file_rows rows.
            kw["target_size"] = int(target * ratio)
            metrics = table.optimize.z_order(list(cluster_columns), **kw)
        else:
            metrics = table.optimize.compact(**kw)
        out["files_added"] = int(metrics.get("numFilesAdded", 0) or 0)
        out["files_removed"] = int(metrics.get("numFilesRemoved", 0) or 0)
        return out

    def dedup(self, name: str, *, target_bytes: int | None = None, dry_run: bool = False) -> dict:
        """Rewrite table `name` with one row per unique key (the row :meth:`read_current` picks),
        range-partitioned and sorted by the key into files of ~`target_bytes` (each file a narrow
        key range, so a key filter skips the others): one overwrite commit, Delta app
        transactions kept. Two jobs over the key column and one rewrite; a no-op (one job) when
        no key repeats. The table must not move meanwhile (see :meth:`overwrite`)."""
        import math

        spec = self.unique_key(name)
        if spec is None:
            raise LakeError(f"table '{name}' has no unique key (lake.unique_keys)")
        key, order = spec
        before = self.table_summary(name)
        version = before["version"]
        df = self.read(name, version=version)
        keys = df.select(key).distinct().count()
        out = {"rows_before": before["rows"], "rows_after": keys, "duplicates": before["rows"] - keys,
               "files_added": 0, "files_removed": 0, "key": key}
        if dry_run or keys == before["rows"]:
            out["rows_after"] = before["rows"] if dry_run else keys
            return out
        target = int(target_bytes or self.target_file_bytes(name))
        n_files = max(1, math.ceil(before["bytes"] * keys / max(1, before["rows"]) / target))
        unique = one_row_per_key(df, key, order).repartitionByRange(n_files, key).sortWithinPartitions(key)
        codec, _ = self._codec(name, self.file_stats(name)[0]["path"])
        res = self.overwrite(name, unique, stage="maintain", compression=codec.lower(),
                             metadata={"stage": "maintain", "dedup": key}, expect_version=version)
        out.update(files_added=res.files, files_removed=before["files"], rows_after=res.rows or keys)
        return out

    def _codec(self, name: str, rel_path: str) -> tuple[str, float]:
        """The compression codec of one live file of the table and its uncompressed/compressed
        size ratio (from its footer)."""
        full = f"{self.table_path(name)}/{rel_path}"
        if _is_local(full):
            meta = pq.read_metadata(_local_path(full))
        else:
    
            fs, p = self.filesystem(full)
            with fs.open(p, "rb") as fh:
                meta = pq.read_metadata(fh)
        if meta.num_row_groups == 0 or meta.num_columns == 0:
            return "ZSTD", 1.0
        codec = meta.row_group(0).column(0).compression.upper()
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        packed = sum(g.column(c).total_compressed_size for g in groups for c in range(g.num_columns))
        ratio = max(1.0, sum(g.total_byte_size for g in groups) / packed) if packed else 1.0
        return (codec if codec in ("SNAPPY", "GZIP", "BROTLI", "LZ4", "ZSTD", "LZ4_RAW") else "ZSTD"), ratio

    def vacuum(self, name: str, retention_hours: float | None = None, dry_run: bool = False) -> list[str]:
        """Delete files no version of the last `retention_hours` references (removed by a commit,
        or written by a failed attempt and never committed); returns their paths."""
        hours = self.cfg.vacuum_retention_hours if retention_hours is None else retention_hours
        if hours < 0:
            raise LakeError(f"table '{name}': vacuum retention must be >= 0 hours, got {hours}")
        if self.backend == "delta-spark":
            conf = self.spark.conf
            conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
            # Delta's VACUUM lists and diffs files in jobs of
            # spark.sql.sources.parallelPartitionDiscovery.parallelism (default 10,000) tasks and
            # spark.sql.shuffle.partitions: measured 26 jobs / 170,483 tasks for a 3-file table.
            # The cluster's slots are enough parallelism for a listing; restored afterwards.
            key = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
            before = conf.get(key, None)
            conf.set(key, str(max(1, self.spark.sparkContext.defaultParallelism)))
            try:
                sql = f"VACUUM delta.`{self.table_path(name)}` RETAIN {float(hours)} HOURS"
                rows = self.spark.sql(sql + (" DRY RUN" if dry_run else "")).collect()
            finally:
                if before is None:
                    conf.unset(key)
                else:
                    conf.set(key, before)
            return [r[0] for r in rows] if dry_run else []
        table = self._delta_table(name)
        # full=True also lists files no log entry names (a killed write's Parquet). delta-rs lists
        # a removed file again on every run while its tombstone lives: keep only files that exist,
        # and commit no VACUUM entries when there is nothing to delete.
        kw = dict(retention_hours=int(hours), enforce_retention_duration=False, full=True)
        path = self.table_path(name)
        listed = [p if (p.startswith("/") or "://" in p) else f"{path}/{p}"
                  for p in table.vacuum(dry_run=True, **kw)]
        if _is_local(path):
            present = [p for p in listed if os.path.exists(_local_path(p))]
        else:
            import fsspec

            fs, _ = self.filesystem(path)
            with ThreadPoolExecutor(max_workers=16) as pool:
                present = [p for p, ok in zip(listed, pool.map(fs.exists, listed)) if ok]
        if present and not dry_run:
            table.vacuum(dry_run=False, **kw)
        return present

    def stale_staging(self, name: str, grace_hours: float | None = None) -> list[str]:
        """delta-rs staging folders (`part-*`) that can go: no live file in them, nothing younger
        than the grace period (a write may be in flight), and no Parquet left that vacuum keeps
        (a file of a version still inside the retention window). Spark's `_temporary` leftovers
        and `_SUCCESS`/`.crc` files do not count: vacuum never looks at them."""
        if self.backend != "delta-rs" or not self.exists(name):
            return []
        grace = self.cfg.staging_grace_hours if grace_hours is None else grace_hours
        cutoff = time.time() - grace * 3600
        live = {s["path"].split("/", 1)[0] for s in self.file_stats(name) if "/" in s["path"]}
        path = self.table_path(name)
        stale = []
        for folder, files in self._staging_folders(path).items():
            if folder in live:
                continue
            if any(mtime > cutoff for _, mtime in files):
                continue
            if any(rel.endswith(".parquet") and not _hidden(rel) for rel, _ in files):
                continue
            stale.append(folder)
        return sorted(stale)

    def remove_staging(self, name: str, grace_hours: float | None = None,
                       dry_run: bool = False) -> list[str]:
        """Delete the folders :meth:`stale_staging` lists; returns them."""
        stale = self.stale_staging(name, grace_hours)
        if dry_run or not stale:
            return stale
        path = self.table_path(name)
        if _is_local(path):
            import shutil

            for folder in stale:
                shutil.rmtree(os.path.join(_local_path(path), folder), ignore_errors=True)
        else:
            import fsspec

            fs, p = self.filesystem(path)
            for folder in stale:
                fs.rm(f"{p}/{folder}", recursive=True)
        return stale

    def _staging_folders(self, path: str) -> dict[str, list[tuple[str, float]]]:
        """`part-*` folder -> [(path inside it, mtime)] (an empty folder gets its own mtime)."""
        out: dict[str, list[tuple[str, float]]] = {}
        if _is_local(path):
            root = _local_path(path)
            for folder in os.listdir(root):
                full = os.path.join(root, folder)
                if not folder.startswith("part-") or not os.path.isdir(full):
                    continue
                files = [(os.path.relpath(os.path.join(d, n), full), os.path.getmtime(os.path.join(d, n)))
                         for d, _, names in os.walk(full) for n in names]
                out[folder] = files or [("", _folder_time(folder, os.path.getmtime(full)))]
            return out
        import fsspec

        fs, p = self.filesystem(path)
        for entry in fs.ls(p, detail=True):
            folder = os.path.basename(entry["name"].rstrip("/"))
            if entry.get("type") != "directory" or not folder.startswith("part-"):
                continue
            found = fs.find(entry["name"], detail=True)
            files = [(k[len(entry["name"].rstrip("/")) + 1:], _mtime(v)) for k, v in found.items()]
            out[folder] = files or [("", _folder_time(folder, time.time()))]
        return out

    def checkpoint(self, name: str) -> None:
        """Write a checkpoint of the current version (readers replay from it, not from every
        commit) and drop log files older than `delta.logRetentionDuration`, as delta-spark does
        on its own at checkpoints. Unit done-tracking must not depend on those old commits."""
        if self.backend == "delta-spark":
            jvm = self.spark._jvm
            delta_log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(
                self.spark._jsparkSession, self.table_path(name))
            try:
                delta_log.checkpoint()
            except Exception:  # newer Delta: checkpoint(snapshot)
                delta_log.checkpoint(delta_log.update(False, jvm.scala.Option.empty(),
                                                      jvm.scala.Option.empty()))
            return
        table = self._delta_table(name)
        table.create_checkpoint()
        table.cleanup_metadata()

    # ----------------------------------------------------------------- SQL
    def register_views(self) -> list[str]:
        """Every table under the root becomes a temp view by its name (for `laion-spark sql`);
        a table with a unique key also gets `current_<name>` (:meth:`read_current`)."""
        names = self.tables()
        for n in names:
            self.read(n).createOrReplaceTempView(n)
            if self.unique_key(n):
                self.read_current(n).createOrReplaceTempView(f"current_{n}")
        return names


# --------------------------------------------------------------------- helpers
def _hidden(rel: str) -> bool:
    """A path Delta's vacuum skips (any component starting with `_` or `.`)."""
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _folder_time(folder: str, fallback: float) -> float:
    """When a delta-rs staging folder was made, from its name (`part-YYYYmmddTHHMMSS-<id>`): an
    emptied folder's own mtime is the time of the last deletion in it, not of the write."""
    try:
        stamp = dt.datetime.strptime(folder.split("-")[1], "%Y%m%dT%H%M%S")
    except (IndexError, ValueError):
        return fallback
    return stamp.replace(tzinfo=dt.timezone.utc).timestamp()


def _mtime(info: dict) -> float:
    """Modification time of an fsspec `info` entry (local: mtime, S3: LastModified)."""
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if value is None:
        return time.time()
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value)


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    if a == b:
        return True
    # delta-rs reads strings/binary back as their large/view variants; timestamps may differ in tz.
    norm = {pa.large_string(): pa.string(), pa.string_view(): pa.string(),
            pa.large_binary(): pa.binary(), pa.binary_view(): pa.binary()}
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b):
        return True
    if pa.types.is_list(a) or pa.types.is_large_list(a):
        if pa.types.is_list(b) or pa.types.is_large_list(b):
            return _same_type(a.value_type, b.value_type)
    return norm.get(a, a) == norm.get(b, b)


def _arrow_schema_from_spark(schema) -> pa.Schema:
    from laion_spark.spark import to_arrow_schema

    arrow = to_arrow_schema(schema)
    fields = []
    for f in arrow:
        t = f.type
        if pa.types.is_timestamp(t):
            t = pa.timestamp("us", tz="UTC")
        fields.append(pa.field(f.name, t, nullable=True))
    return pa.schema(fields)


def _spark_schema_from_arrow(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    norm = []
    for f in schema:
        norm.append(pa.field(f.name, _normalise_arrow_type(f.type), nullable=True))
    return from_arrow_schema(pa.schema(norm))


def _normalise_arrow_type(t: pa.DataType) -> pa.DataType:
    if t in (pa.large_string(), pa.string_view()):
        return pa.string()
    if t in (pa.large_binary(), pa.binary_view()):
        return pa.binary()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC")
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_normalise_arrow_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _normalise_arrow_type(f.type)) for f in t])
    return t


def _stat_value(v):
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return v.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, bytes):
        return None
    if isinstance(v, float) and (v != v):  # NaN
        return None
    return v


def parquet_file_stats(meta: pq.FileMetaData) -> dict:
    """Delta `add.stats` from a Parquet footer: numRecords, min/max and null counts per column.

    Only top-level primitive columns; strings longer than 64 chars and binaries get no min/max
    (Delta allows a column to have no stats; a wrong bound would make readers skip live rows).
    """
    stats: dict = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    schema = meta.schema.to_arrow_schema()
    top_level = {f.name for f in schema if not pa.types.is_nested(f.type)}
    mins: dict = {}
    maxs: dict = {}
    nulls: dict = {}
    no_minmax: set = set()
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for ci in range(group.num_columns):
            col = group.column(ci)
            name = col.path_in_schema
            if name not in top_level:
                continue
            st = col.statistics
            if st is None:
                no_minmax.add(name)
                nulls.pop(name, None)
                continue
            if st.has_null_count:
                nulls[name] = nulls.get(name, 0) + st.null_count
            if not st.has_min_max or group.num_rows == st.null_count:
                if group.num_rows != st.null_count:
                    no_minmax.add(name)
                continue
            lo, hi = _stat_value(st.min), _stat_value(st.max)
            if lo is None or hi is None or (isinstance(lo, str) and
                                            (len(lo) > _STATS_STRING_MAX or len(hi) > _STATS_STRING_MAX)):
                no_minmax.add(name)
                continue
            mins[name] = lo if name not in mins else min(mins[name], lo)
            maxs[name] = hi if name not in maxs else max(maxs[name], hi)
    for name in top_level:
        if name in mins and name not in no_minmax:
            stats["minValues"][name] = mins[name]
            stats["maxValues"][name] = maxs[name]
        if name in nulls:
            stats["nullCount"][name] = nulls[name]
    return stats
