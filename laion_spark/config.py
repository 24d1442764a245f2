"""One typed configuration tree for every stage, loaded from YAML with `--set a.b=c` overrides.

Why dataclasses and a strict loader: a typo in a 5-billion-row job's config must fail before the
cluster spins up, with the key and the file named, not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

PACKAGE_CONF_DIR = Path(__file__).resolve().parent / "conf"
REPO_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names key and source."""


MISSING: Any = dataclasses.MISSING


@dataclass
class SparkConfig:
    """How the session is built when not launched by spark-submit with its own master."""

    master: str = "local[*]"
    app_name: str = "laion-spark"
    log_level: str = "WARN"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"
    extra_conf: dict[str, str] = field(default_factory=dict)
    # Delta + hadoop-aws jars for a session this process starts: "auto" = .jars/spark-<x.y>/
    # beside the package when scripts/setup-jars.sh made it, "" = none, else a folder.
    jars_dir: str = "auto"


@dataclass
class LakeConfig:
    """Where the Delta tables live and which backend commits them."""

    root: str = "./lake"
    backend: str = "auto"  # auto | delta-spark | delta-rs
    storage_options: dict[str, str] = field(default_factory=dict)
    target_file_rows: int = 250_000  # `maintain` compacts files toward this many rows (x avg row bytes)
    max_file_bytes: int = 1_073_741_824  # ...but never above this size per compacted file (images rows)
    vacuum_retention_hours: float = 168.0  # removed files kept this long (time travel, readers in flight)
    staging_grace_hours: float = 24.0  # an unreferenced part-* folder younger than this may be a live write
    cluster_columns: dict[str, list[str]] = field(
        default_factory=lambda: {"candidates": ["uid"]})  # z-order per table (uid filters skip files)
    # Tables that keep one current row per key: [key, then the columns whose smallest value picks
    # the row]. Appends may repeat a key (extract's waves dedup only inside the wave); readers use
    # Lake.read_current / the `current_<table>` view, and `maintain` rewrites the repeats away.
    unique_keys: dict[str, list[str]] = field(
        default_factory=lambda: {"candidates": ["uid", "source_file", "record_offset", "url", "page_url"]})


@dataclass
class ExtractConfig:
    """LAION-5B candidate rules (each configurable) and the input list."""

    inputs: list[str] = field(default_factory=list)
    input_format: str = "auto"  # auto | warc | wat
    listing_prefix: str = "https://data.commoncrawl.org/"
    sample_files: Optional[int] = None
    sample_seed: int = 0
    crawl: str = ""
    min_text_length: int = 5
    max_text_length: int = 4096
    max_hostname_length: int = 60
    drop_extensions: list[str] = field(default_factory=lambda: [".svg", ".gif"])
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    max_html_bytes: int = 5_000_000
    language_min_prob: float = 0.5
    batch_rows: int = 8192
    # Anti-join each wave's uids against the whole `candidates` uid column (a scan of the table
    # per wave: cost follows the table, not the wave). Off: a uid may repeat across waves, readers
    # use lake.read_current("candidates") and `maintain` removes the repeats (see extract/job.py).
    dedup_against_table: bool = False
    max_url_length: int = 2048
    warc_reader: str = "fastwarc"  # fastwarc | warcio (measured: see extract/README.md)
    # Limits on one record (a record over one becomes a failure row `code: detail`; the file goes on).
    # Bytes of a WAT JSON payload; a larger metadata record is `too_large` (Common Crawl's are < 1 MB).
    max_wat_json_bytes: int = 16_000_000
    # Characters of a page's URL (WARC-Target-URI, or the WAT JSON's): every candidate row of the
    # page repeats it, so a longer one is `bad_url` (a 1 MB URI × 3,000 images overflowed an Arrow
    # string column: the task crashed). batch_rows × this bounds a batch's page_url bytes / 4.
    max_page_url_length: int = 8192
    # Unreadable spots (failure rows of the reader) in one file before the rest of it is given up
    # (`too_many_failures`): each restarts the reader, so a file crafted with a gzip magic every
    # 4 bytes was one row per 4 bytes and hours of work. Real files have a handful at most.
    max_read_failures: int = 10_000
    # Open-element nesting of a page before lexbor parses it: lexbor's time grows with depth × tags
    # (16,384 nested <div>: ~1.3 s; 128k: 70 s). Deeper is `too_deep`.
    max_html_depth: int = 32_768
    # Estimated tree-building work of a page (the sum of open-element depths over its start tags):
    # 4e8 ≈ 4 s of lexbor (4,000 deep, then 100k <div></div>). Over it is `too_deep` as well. A page
    # with n start tags has depth ≤ n and work ≤ n²/2, so pages with at most 32,768 (these two
    # defaults) are not scanned: a page that passes costs lexbor ≤ ~5 s, a record's worst case.
    max_html_parse_work: int = 540_000_000
    # Hash every complete block against WARC-Block-Digest (always on for blocks that swallowed a
    # record header); costs ~25 % of the WARC path per core, so off by default.
    verify_digests: bool = False
    # fetch_time outside [min_fetch_year, now + 1 day] is null with a `bad_date` failure row.
    min_fetch_year: int = 1990
    # Waves (laion_spark/waves.py): files per wave = task slots × files_per_slot, capped; one
    # commit per wave (the resume granularity: a crash redoes at most one wave).
    files_per_slot: float = 2.0
    max_files_per_wave: int = 2048
    # Transient read errors (S3 503, connection reset, timeouts): the task re-reads the file up to
    # transient_retries times (transient_backoff_s apart, doubling), then raises so Spark retries
    # the task; on Spark's last attempt the file gets a `transient_io` failure row and stays pending.
    transient_retries: int = 2
    transient_backoff_s: float = 1.0


@dataclass
class DownloadConfig:
    """img2dataset-style download, resize and encode, plus the safety rules."""

    shard_size: int = 1000
    threads_per_task: int = 32
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_deadline_s: float = 20.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    retries: int = 0
    user_agent: str = (
        "laion-spark/0.1 (+https://github.com/laion-spark/laion-spark#opt-out)"
    )
    respect_robots_headers: bool = True
    disallowed_robots_values: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    per_host_concurrency: int = 4
    allow_private_addresses: bool = False
    allow_loopback: bool = False
    min_image_bytes: int = 5000
    max_image_pixels: int = 89_478_484
    allowed_formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])
    image_size: int = 256
    resize_mode: str = "border"  # no | keep_ratio | center_crop | border
    resize_only_if_bigger: bool = False
    output_format: str = "jpg"  # jpg | webp
    encode_quality: int = 95
    decode_workers: int = 2
    retry_failed: bool = False
    # Waves: shards per wave = task slots × shards_per_slot, capped by max_shards_per_wave; one
    # task per shard, one `images` file per shard, one commit per wave (the resume granularity).
    shards_per_slot: float = 2.0
    max_shards_per_wave: int = 4096
    compression: str = "snappy"  # Parquet codec of `images` (its JPEG/WEBP bytes do not shrink)
    decode_deadline_s: float = 10.0  # per image: decoding stops between input pieces after this (failed: timeout)
    # Estimated peak of decoding one image (raster + one working copy + progressive JPEG coefficients),
    # from the header, before decoding (failed: too_large). Two decode workers per task: 2x this.
    max_decode_bytes: int = 256_000_000
    max_jpeg_scans: int = 100  # progressive JPEGs have ~10; each scan walks every block (failed: too_many_scans)
    dns_negative_ttl_s: float = 300.0  # a name that did not resolve is not looked up again in a task for this long
    max_dns_cache_entries: int = 4096  # per task; least recently used names are dropped first
    # host -> "address[:port]" used instead of DNS (tests and archive replays only; "*" = every host).
    # The address still passes the address rules (so 127.0.0.1 needs allow_loopback).
    connect_to: dict[str, str] = field(default_factory=dict)


@dataclass
class ScoreConfig:
    """CLIP models, thresholds per language group, and the safety heads."""

    clip_model: str = "openai/clip-vit-base-patch32"
    multilingual_text_model: Optional[str] = None
    use_multilingual_for: list[str] = field(default_factory=lambda: ["multi", "nolang"])
    threshold_en: float = 0.28
    threshold_multi: float = 0.26
    threshold_nolang: float = 0.26
    batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    nsfw_head: Optional[str] = None
    watermark_head: Optional[str] = None
    toxic_head: Optional[str] = None
    preprocess_threads: Union[int, str] = "auto"  # decode threads per task; auto: the executor's cores per task
    prefetch_batches: int = 2  # decoded batches queued ahead of the model
    partitions: Optional[int] = None  # repartition the images rows (None: keep the read's split)
    # Waves: shards per wave = GPUs (cores on CPU) × shards_per_slot, capped by max_shards_per_wave.
    shards_per_slot: float = 2.0
    max_shards_per_wave: int = 1024
    load_log_dir: Optional[str] = None  # each executor process appends a line per model load (tests)
    broadcast_max_bytes: int = 536_870_912  # larger models (ViT-L/H) are loaded by executors from their path
    model_cache_dir: Optional[str] = None  # executors' local copy of path-loaded models (default: temp dir)


@dataclass
class IndexConfig:
    """faiss index parameters chosen from the vector count and a memory budget."""

    table: str = "pairs"
    filter: str = "passes_filter"
    table_version: Optional[int] = None
    output: str = ""  # folder or s3:// / gs:// URL of the indices; "" = <lake.root>/_indices
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for output (s3fs: key, secret, client_kwargs)
    memory_budget_gb: float = 4.0
    latency_target_ms: float = 10.0
    index_key: Optional[str] = None
    train_samples_per_cluster: int = 64
    max_train_vectors: int = 4_000_000  # training sample cap: driver holds it as float16 per modality + one float32 copy; nlist ≤ this / 30
    max_nlist: int = 131_072  # 2^17: k-means stays trainable on one driver/GPU (unless index_key forces more)
    recall_queries: int = 1000
    seed: int = 0
    use_gpu: bool = False
    opq: str = "auto"  # auto | on | off
    opq_iterations: int = 25  # OPQ rotation/PQ alternations (faiss's default 50; see index README)
    merge: str = "auto"  # auto (ondisk when larger than merge_memory_gb) | ondisk | memory | none (parts served as shards)
    merge_memory_gb: float = 16.0
    merge_after_add: bool = True  # False: the job stops after the parts; run `laion-spark index --merge-only` elsewhere
    merge_dir: str = ""  # local scratch of the merge when output is a URL ("" = a temp folder)
    max_single_metadata_rows: int = 2_000_000  # also write one <out>/metadata.parquet up to this many rows
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])


@dataclass
class DemoConfig:
    """The generated demo web the README's first command runs on."""

    out_dir: str = "./demo-out"
    seed: int = 0
    n_pages: int = 240
    clip_model_dir: Optional[str] = None


@dataclass
class ServeConfig:
    """`laion-spark serve`: the search service's limits and its server-side filter defaults."""

    host: str = "127.0.0.1"
    port: int = 1234
    workers: int = 2  # uvicorn worker processes, each with its own encoders and mmapped index
    device: str = "cpu"  # query encoders: cpu | cuda | auto
    max_num_images: int = 10_000  # results with metadata per query; over it is a 400
    max_num_result_ids: int = 100_000  # ids one query may ask faiss for; over it is a 400
    max_body_bytes: int = 16_000_000  # request body (a base64 image); over it is a 413
    max_json_values: int = 100_000  # commas + brackets in a body, counted before parsing; over: 413 (>= 2 x export_max_rows)
    max_image_bytes: int = 10_000_000  # decoded query image bytes (upload or image_url)
    max_image_pixels: int = 40_000_000  # width x height of a query image; over it: decompression bomb
    max_text_chars: int = 2_000  # query text; longer is cut, not refused
    url_deadline_s: float = 10.0  # image_url fetch, total (through the downloader's fetcher)
    max_metadata_ids: int = 10_000  # ids per /metadata call
    request_read_timeout_s: float = 10.0  # connection open (or a request's first byte) to its body's end; over: 408, closed
    max_header_bytes: int = 65_536  # request line + headers; over: 431, closed (httptools has no cap)
    write_stall_timeout_s: float = 30.0  # an answer the client stops reading; over: connection aborted
    max_connections_per_client: int = 64  # open connections per client address per worker; over: 503, closed; 0: no cap
    safe_mode: bool = True  # drop punsafe > nsfw_threshold unless the query turns it off
    nsfw_threshold: float = 0.5
    dedup_urls: bool = True  # collapse duplicate URLs (best-ranked kept) unless turned off
    near_dup_threshold: float = 0.94  # cosine among results' reconstructed vectors
    near_dup_max_results: int = 5_000  # the near-dup pass covers this many best results (n² cost)
    large_k_nprobe_per: int = 3_000  # k >= 100k: nprobe raised to ceil(k / this), as clip back
    nprobe: int = 0  # > 0: every IVF index searched at this nprobe; 0: the folder's index_params.json
    min_candidates_per_k: float = 3.0  # nprobe raised so the probed lists hold ~this × k vectors
    export_max_rows: int = 10_000  # rows one export may hold
    columns_to_return: list[str] = field(default_factory=lambda: [
        "url", "caption", "similarity", "punsafe", "pwatermark", "width", "height", "uid",
        "language", "language_group"])


@dataclass
class Config:
    """The whole tree; every stage reads its own section."""

    spark: SparkConfig = field(default_factory=SparkConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            f"{source}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"{source}: key '{key}' expects a list, got {type(value).__name__} {value!r}"
            )
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: key '{key}' expects a mapping, got {type(value).__name__} {value!r}"
            )
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: key '{key}' is a section, expects a mapping, got {type(value).__name__}"
            )
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (
        tp is int and isinstance(value, bool)
    ):
        return value
    raise ConfigError(
        f"{source}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = f"{prefix}.{k}" if prefix else k
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{full}' (known keys here: {known})")
    kwargs = {}
    for name, f in names.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], full, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{full}'")
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`download.threads_per_task=16` → (['download', 'threads_per_task'], 16); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set '{text}': value is not valid YAML: {exc}") from exc
    return parts, value


def default_config_path() -> Path:
    """conf/local.yaml of the checkout, else the copy shipped inside the package."""
    for d in (REPO_CONF_DIR, PACKAGE_CONF_DIR):
        if (d / "local.yaml").exists():
            return d / "local.yaml"
    return REPO_CONF_DIR / "local.yaml"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Load `path` (default: conf/local.yaml) and apply `--set` overrides, refusing bad keys/types."""
    source_path = Path(path) if path else default_config_path()
    data: dict = {}
    if path is not None or source_path.exists():
        try:
            text = source_path.read_text()
        except OSError as exc:
            raise ConfigError(f"{source_path}: cannot read config: {exc}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source_path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{source_path}: top level must be a mapping of sections")
    source = str(source_path)
    cfg = _build(Config, data, "", source)
    for text in overrides or []:
        parts, value = parse_override(text)
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        data = _merge(data, nested)
        cfg = _build(Config, data, "", f"--set {text}")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
