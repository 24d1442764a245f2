"""The search core, no HTTP: a validated query → embedding → faiss top-k → filters → rows.

Filters run on the server with defaults on (clip back's raw HTTP defaults are off, research
§1.5): safe mode (punsafe above the threshold dropped), duplicate URLs collapsed, near-duplicate
images collapsed (cosine ≥ 0.94 among the results' reconstructed vectors, the best-ranked kept),
plus ours: language groups, minimum query similarity, maximum pwatermark/punsafe. Each filter
counts what it removed, in the order they run, so a client sees why it got fewer rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from laion_spark.config import DownloadConfig, ServeConfig
from laion_spark.serve import encoders
from laion_spark.serve.encoders import QueryError
from laion_spark.serve.store import IndexFolder

# Metadata column → the field name a result carries (clip-retrieval calls the text "caption";
# its "similarity" is the query's, so the row's CLIP similarity becomes clip_similarity).
RESULT_FIELDS = {"url": "url", "text": "caption", "similarity": "clip_similarity",
                 "punsafe": "punsafe", "pwatermark": "pwatermark", "width": "width",
                 "height": "height", "uid": "uid", "language": "language",
                 "language_group": "language_group", "ptoxic": "ptoxic"}
FIELD_COLUMNS = {v: k for k, v in RESULT_FIELDS.items()}
FILTER_ORDER = ("unsafe", "language_group", "pwatermark", "min_similarity", "duplicate_url",
                "near_duplicate")


@dataclass
class Query:
    """One /knn-service or /api/search request after validation."""

    indice_name: str
    modality: str = "image"
    text: Optional[str] = None
    image: Optional[str] = None
    image_url: Optional[str] = None
    embedding_input: Optional[list] = None
    num_images: int = 40
    num_result_ids: int = 40
    use_mclip: bool = False
    deduplicate: bool = True
    use_safety_model: bool = True
    dedup_urls: bool = True
    use_violence_detector: bool = False  # accepted; no violence detector is served (README)
    aesthetic_score: Optional[int] = None  # accepted; no aesthetic embeddings are served
    aesthetic_weight: Optional[float] = None
    language_groups: Optional[list[str]] = None
    min_similarity: Optional[float] = None
    max_pwatermark: Optional[float] = None
    max_punsafe: Optional[float] = None


@dataclass
class SearchResult:
    rows: list[dict]  # first num_images with metadata, then id + similarity only
    removed: dict[str, int]
    retrieved: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    query_kind: str = ""
    indice_name: str = ""


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, None)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise QueryError("bad_field", f"{key} must be true or false, got {v!r}")


def _int(body: dict, key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    v = body.get(key, None)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, float) and (not math.isfinite(v) or v != int(v))):
        raise QueryError("bad_field", f"{key} must be an integer, got {v!r}")
    v = int(v)
    if v < lo or v > hi:
        raise QueryError("out_of_range", f"{key}={v} is outside [{lo}, {hi}]")
    return v


def _float(body: dict, key: str) -> Optional[float]:
    v = body.get(key, None)
    if v is None or v == "":
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise QueryError("bad_field", f"{key} must be a number, got {v!r}")
    try:
        f = float(v)
    except ValueError as exc:
        raise QueryError("bad_field", f"{key} must be a number, got {v!r}") from exc
    if not math.isfinite(f):
        raise QueryError("bad_field", f"{key} must be finite")
    return f


def parse_query(body: Any, indices: dict[str, IndexFolder], cfg: ServeConfig) -> Query:
    """Validate a request body (a JSON object) into a Query; QueryError (4xx) says what is wrong."""
    if not isinstance(body, dict):
        raise QueryError("bad_request", "the body must be a JSON object")
    name = body.get("indice_name") or next(iter(indices))
    if not isinstance(name, str) or name not in indices:
        raise QueryError("unknown_indice", f"indice_name {str(name)[:100]!r} is not served; "
                         f"known: {sorted(indices)}", 404)
    folder = indices[name]
    modality = body.get("modality") or "image"
    if not isinstance(modality, str) or modality not in folder.indices:  # a list: unhashable
        raise QueryError("bad_modality", f"modality {str(modality)[:50]!r} is not one of "
                         f"{sorted(folder.indices)} for {name}")
    given = [k for k in ("text", "image", "image_url", "embedding_input") if body.get(k)]
    if len(given) != 1:
        raise QueryError("bad_query", "send exactly one of text, image (base64), image_url, "
                         f"embedding_input (got {given or 'none'})")
    num_images = _int(body, "num_images", 40, 1, cfg.max_num_images)
    num_result_ids = _int(body, "num_result_ids", num_images, 1, cfg.max_num_result_ids)
    num_result_ids = max(num_result_ids, num_images)
    groups = body.get("language_groups", body.get("language_group"))
    if isinstance(groups, str):
        groups = [g for g in groups.split(",") if g]
    if groups is not None and (not isinstance(groups, list)
                               or not all(isinstance(g, str) for g in groups)):
        raise QueryError("bad_field", "language_groups must be a list of strings")
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise QueryError("bad_field", "text must be a string")
    aesthetic = body.get("aesthetic_score")
    return Query(
        indice_name=name, modality=modality, text=text[: cfg.max_text_chars] if text else None,
        image=body.get("image"), image_url=body.get("image_url"),
        embedding_input=body.get("embedding_input"),
        num_images=num_images, num_result_ids=num_result_ids,
        use_mclip=_bool(body, "use_mclip", False),
        deduplicate=_bool(body, "deduplicate", True),
        use_safety_model=_bool(body, "use_safety_model", cfg.safe_mode),
        dedup_urls=_bool(body, "dedup_urls", cfg.dedup_urls),
        use_violence_detector=_bool(body, "use_violence_detector", False),
        aesthetic_score=aesthetic if isinstance(aesthetic, int) else None,
        aesthetic_weight=_float(body, "aesthetic_weight"),
        language_groups=groups or None,
        min_similarity=_float(body, "min_similarity"),
        max_pwatermark=_float(body, "max_pwatermark"),
        max_punsafe=_float(body, "max_punsafe"),
    )


def _embedding_from_input(value: Any, dim: int) -> np.ndarray:
    # One set of the element types, not an isinstance call per value (~0.3 ms at 512-d).
    if not isinstance(value, list) or not {type(v) for v in value} <= {int, float}:
        raise QueryError("bad_embedding", "embedding_input must be a list of numbers")
    if len(value) != dim:
        raise QueryError("bad_embedding", f"embedding_input has {len(value)} values, this index "
                         f"needs {dim}")
    try:
        x = np.asarray(value, dtype=np.float64)
    except OverflowError as exc:  # an integer over float's range (json reads 10**400)
        raise QueryError("bad_embedding", "embedding_input has a value over float range") \
            from exc
    if not np.isfinite(x).all():
        raise QueryError("bad_embedding", "embedding_input has NaN or infinite values")
    peak = float(np.abs(x).max())
    if peak == 0.0:
        raise QueryError("bad_embedding", "embedding_input is the zero vector")
    x = x / peak  # the norm of values near 1e308 overflows to inf (x / inf: the zero vector)
    return (x / np.linalg.norm(x)).astype(np.float32)


def embed_query(q: Query, folder: IndexFolder, cfg: ServeConfig, dcfg: DownloadConfig,
                timings: dict, device: str = "cpu") -> tuple[np.ndarray, str]:
    """The query's normalised embedding and its kind (text, image, image_url, embedding)."""
    if q.embedding_input:
        return _embedding_from_input(q.embedding_input, folder.dim), "embedding"
    if not folder.clip_model:
        raise QueryError("no_model", f"index {folder.name} has no recorded CLIP model (no "
                         "model.json): start the server with --clip-model, or send "
                         "embedding_input", 400)
    t = time.perf_counter()
    enc = encoders.get_encoder(folder.clip_model, folder.text_model, device)
    if enc.dim != folder.dim:
        raise QueryError("model_mismatch", f"the CLIP model embeds {enc.dim}-d, the index is "
                         f"{folder.dim}-d", 500)
    timings["encoder_load_ms"] = _ms(t)
    if q.text:
        t = time.perf_counter()
        x = enc.embed_text(q.text, multilingual=q.use_mclip)
        timings["embed_text_ms"] = _ms(t)
        return _normalise(x), "text"
    if q.image:
        data = encoders.decode_base64_image(q.image, cfg.max_image_bytes)
        kind = "image"
    else:
        t = time.perf_counter()
        data = encoders.fetch_query_image(q.image_url, cfg, dcfg)
        timings["fetch_url_ms"] = _ms(t)
        kind = "image_url"
    t = time.perf_counter()
    x = enc.embed_image(data, cfg.max_image_pixels)
    timings["embed_image_ms"] = _ms(t)
    return _normalise(x), kind


def _normalise(x: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return x / n if n > 0 else x


def _ms(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 3)


def near_duplicate_mask(vectors: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """keep[i] is False when a better-ranked kept row has cosine ≥ threshold with row i.

    Greedy in rank order, so the best of each group is kept (clip back keeps the first member
    of each connected component of its range search; greedy also keeps a row whose only near
    twin was itself dropped). Exact: blocks of rows against the rows after them (n² · d
    multiply-adds, which is why the caller caps n at `near_dup_max_results`)."""
    n = len(vectors)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for a in range(0, n, block):
        b = min(n, a + block)
        close = (x[a:b] @ x[a:].T) >= threshold  # rows a..b against rows a..n
        for i in range(a, b):
            if keep[i]:
                row = close[i - a, i - a + 1:]
                if row.any():
                    keep[i + 1:] &= ~row
    return keep


def run_search(q: Query, folder: IndexFolder, cfg: ServeConfig, dcfg: DownloadConfig,
               device: str = "cpu") -> SearchResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    query, kind = embed_query(q, folder, cfg, dcfg, timings, device)
    t = time.perf_counter()
    sims, ids, vecs = folder.search(q.modality, query, q.num_result_ids,
                                    reconstruct=q.deduplicate, large_k_nprobe_per=
                                    cfg.large_k_nprobe_per,
                                    min_candidates_per_k=cfg.min_candidates_per_k)
    timings["knn_ms"] = _ms(t)
    valid = ids >= 0
    sims, ids = sims[valid], ids[valid]
    if vecs is not None:
        vecs = vecs[valid]
    retrieved = len(ids)
    t = time.perf_counter()
    keep = np.ones(len(ids), dtype=bool)
    removed = {k: 0 for k in FILTER_ORDER}
    meta = folder.metadata
    need = [c for c in ("url", "punsafe", "language_group", "pwatermark") if c in meta.columns]
    # Few candidates (the usual query): one read of every column the filters and the rows
    # need. Many (large K): the filter columns for all, the row columns for the kept head only.
    one_read = len(ids) <= max(4 * q.num_images, 256)
    got = column_lists(meta, ids, list(dict.fromkeys(
        need + (result_columns(meta) if one_read else [])))) if len(ids) else None

    def apply(name: str, mask: np.ndarray) -> None:
        drop = keep & ~mask
        removed[name] += int(drop.sum())
        keep[drop] = False

    if got is not None:
        unsafe_max = q.max_punsafe if q.max_punsafe is not None else (
            cfg.nsfw_threshold if q.use_safety_model else None)
        if unsafe_max is not None and "punsafe" in got:
            p = np.array(got["punsafe"], dtype=np.float64)  # None (not scored) → NaN: kept
            apply("unsafe", ~(p > unsafe_max))
        if q.language_groups and "language_group" in got:
            g = np.array(got["language_group"], dtype=object)
            apply("language_group", np.isin(g, q.language_groups))
        if q.max_pwatermark is not None and "pwatermark" in got:
            w = np.array(got["pwatermark"], dtype=np.float64)
            apply("pwatermark", ~(w > q.max_pwatermark))
        if q.min_similarity is not None:
            apply("min_similarity", sims >= q.min_similarity)
        if q.dedup_urls:
            urls = got["url"]
            seen: set = set()
            mask = np.ones(len(ids), dtype=bool)
            for i in np.flatnonzero(keep).tolist():
                u = urls[i]
                if u in seen:
                    mask[i] = False
                else:
                    seen.add(u)
            apply("duplicate_url", mask)
        if q.deduplicate and vecs is not None:
            alive = np.nonzero(keep)[0][: cfg.near_dup_max_results]
            sub = near_duplicate_mask(vecs[alive], cfg.near_dup_threshold)
            mask = np.ones(len(ids), dtype=bool)
            mask[alive[~sub]] = False
            apply("near_duplicate", mask)
    timings["filter_ms"] = _ms(t)
    kept = np.flatnonzero(keep)
    kept_ids, kept_sims = ids[kept], sims[kept]
    t = time.perf_counter()
    if one_read and got is not None:
        head = _rows(kept_ids[: q.num_images], {c: [v[i] for i in kept[: q.num_images].tolist()]
                                                for c, v in got.items()}, meta)
    else:
        head = rows_for(folder, kept_ids[: q.num_images])
    for row, s in zip(head, kept_sims[: q.num_images].tolist()):
        row["similarity"] = s
    tail = [{"id": i, "similarity": s}
            for i, s in zip(kept_ids[q.num_images:].tolist(), kept_sims[q.num_images:].tolist())]
    timings["metadata_ms"] = _ms(t)
    timings["total_ms"] = _ms(started)
    return SearchResult(head + tail, removed, retrieved, timings, kind, folder.name)


# Above this many ids a metadata read goes through Arrow's vectorised take; below, straight
# from the mapped buffers (a Python loop per value, but no per-call Arrow overhead).
PYLIST_MAX_IDS = 2048


def column_lists(meta, ids: np.ndarray, columns: list[str]) -> dict[str, list]:
    """{column: Python values for ids, in order} for the columns the metadata has."""
    cols = [c for c in columns if c in meta.columns]
    if len(ids) <= PYLIST_MAX_IDS:
        return meta.pylists(ids, cols)
    table = meta.take(ids, cols)
    return {c: table.column(c).to_pylist() for c in cols}


def result_columns(meta) -> list[str]:
    return [c for c in RESULT_FIELDS if c in meta.columns]


def _rows(ids: np.ndarray, values: dict[str, list], meta) -> list[dict]:
    """Result dicts (id first, clip-retrieval's field names) from per-column value lists."""
    data = {RESULT_FIELDS.get(c, c): _present(values[c], meta.schema.field(c).type)
            for c in values if c in RESULT_FIELDS}
    out = []
    for k, i in enumerate(ids.tolist()):
        row = {"id": i}
        for name, vals in data.items():
            row[name] = vals[k]
        out.append(row)
    return out


def rows_for(folder: IndexFolder, ids: np.ndarray, columns: Optional[list[str]] = None) -> list:
    """Result dicts (id first, clip-retrieval's field names) for ids, in order."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return []
    meta = folder.metadata
    want = columns or list(RESULT_FIELDS)
    return _rows(ids, column_lists(meta, ids, want), meta)


def _present(values: list, typ: pa.DataType) -> list:
    if pa.types.is_floating(typ):
        return [None if v is None or not math.isfinite(v) else round(v, 5) for v in values]
    if pa.types.is_int64(typ):  # uids: int64 is not exact in JavaScript
        return [None if v is None else str(v) for v in values]
    return values


def check_ids(value: Any, folder: IndexFolder, limit: int) -> np.ndarray:
    if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise QueryError("bad_ids", "ids must be a list of integers")
    if len(value) > limit:
        raise QueryError("too_many_ids", f"{len(value)} ids, at most {limit} per call")
    bad = [i for i in value if i < 0 or i >= folder.n]
    if bad:
        raise QueryError("bad_ids", f"ids out of range [0, {folder.n}): {bad[:5]}")
    return np.asarray(value, dtype=np.int64)
