"""Index parameters from the vector count, the dimension and a memory budget.

Why our own chooser rather than autofaiss's: the same inputs (N, d, bytes), but faiss's own
guidelines for the cluster count, exact (non-HNSW) IVF-Flat or SQ8 when the budget holds them,
OPQ only where a sub-quantizer covers several dimensions, and every decision written down as a
reason that is saved next to the index.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

ID_BYTES = 8  # an int64 id per vector in every inverted list
PQ_CANDIDATES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 8, 4)
MIN_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns: too few points per centroid
MAX_POINTS_PER_CENTROID = 256  # above this faiss subsamples anyway
HNSW_QUANTIZER_FROM = 65_536  # an HNSW32 coarse quantizer from this many lists (faiss wiki)
MAX_OPQ_DIM_LOSS = 1 / 16  # a non-divisor M may cost the OPQ reduction at most this share of d
DEFAULT_MAX_NLIST = 131_072  # IndexConfig.max_nlist
DEFAULT_MAX_TRAIN = 4_000_000  # IndexConfig.max_train_vectors
MIN_TRAIN_PER_CENTROID = 30  # faiss's lower bound on training points per centroid
OPQ_MIN_DIMS = 8  # OPQ when a sub-quantizer covers ≥ 8 dims (measured: OPQ48 on 512-d trains 15× slower than IVF)


class IndexParamsError(ValueError):
    """No index of the supported families fits the memory budget."""


@dataclass
class IndexParams:
    """What the chooser picked and why; saved as index_params.json next to the index."""

    index_key: str
    n_vectors: int
    dim: int
    budget_bytes: int
    nlist: int
    code_bytes: int
    opq: bool
    train_size: int
    estimated_bytes: int
    metric: str = "inner_product"
    nprobe: Optional[int] = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def nlist_for(n: int, max_nlist: int = DEFAULT_MAX_NLIST,
              max_train_vectors: int = DEFAULT_MAX_TRAIN) -> tuple[int, str]:
    """faiss's guideline: 4√N–16√N lists under 1M vectors (we take the low end, rounded up to a
    multiple of 64: fewer centroids train and assign faster on CPU, cost less of the memory
    budget, which then buys a larger code, and each list holds more vectors per probe), then
    65,536 for 1M–10M and 262,144 beyond, capped at `max_nlist` (2^17 by default, as LAION's
    own 5B index) and at max_train_vectors / 30 (faiss's minimum points per centroid), so the
    k-means stays trainable on one driver whatever N is."""
    if n <= 1_000_000:
        k = 64 * math.ceil(4 * math.sqrt(n) / 64)
        reason = f"N={n:,} ≤ 1M: nlist = 4√N ({4 * math.sqrt(n):,.0f}) rounded up to a multiple of 64 = {k:,}"
        cap = max(1, n // MIN_POINTS_PER_CENTROID)
        if k > cap:
            reason += f", capped to N/{MIN_POINTS_PER_CENTROID} = {cap:,} so k-means has enough points"
            k = cap
    elif n <= 10_000_000:
        k, reason = 65_536, f"1M < N={n:,} ≤ 10M: nlist 65,536 (faiss guideline)"
    else:
        k, reason = 262_144, f"N={n:,} > 10M: nlist 262,144 (faiss guideline)"
    if k > max_nlist:
        k = max_nlist
        reason += f", capped at index.max_nlist = {max_nlist:,}"
    by_train = 1 << max(0, int(math.floor(math.log2(max(1, max_train_vectors // MIN_TRAIN_PER_CENTROID)))))
    if k > by_train:
        k = by_train
        reason += (f", capped at {by_train:,} (a power of two ≤ index.max_train_vectors "
                   f"{max_train_vectors:,} / {MIN_TRAIN_PER_CENTROID} points per centroid)")
    return k, reason


def train_size_for(n: int, nlist: int, samples_per_cluster: int,
                   max_train_vectors: int = DEFAULT_MAX_TRAIN) -> int:
    """Per-centroid count (clamped to faiss's 30–256), at least 10,240 for the PQ codebooks,
    never more than N or `max_train_vectors` (the sample the driver holds)."""
    spc = min(max(samples_per_cluster, 30), MAX_POINTS_PER_CENTROID)
    return int(min(n, max_train_vectors, max(spc * nlist, 256 * 40)))


def _fixed_bytes(nlist: int, dim: int, opq_dim: int = 0, pq: bool = False) -> int:
    """Centroids, the HNSW graph over them, the OPQ matrix, the PQ codebooks (256 centroids per
    sub-quantizer: 256 × D floats in all): what the index costs besides codes."""
    b = nlist * dim * 4
    if pq:
        b += 256 * (opq_dim or dim) * 4
    if nlist >= HNSW_QUANTIZER_FROM:
        b += nlist * 32 * 2 * 4
    if opq_dim:
        b += dim * opq_dim * 4
    return b


def _ivf(nlist: int) -> str:
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"


def choose_params(n: int, dim: int, budget_bytes: int, samples_per_cluster: int = 64,
                  index_key: Optional[str] = None, opq: str = "auto",
                  max_nlist: int = DEFAULT_MAX_NLIST,
                  max_train_vectors: int = DEFAULT_MAX_TRAIN) -> IndexParams:
    """The best index of IVF-Flat > IVF-SQ8 > IVF-(OPQ)PQ{M} that fits `budget_bytes`.

    Bytes per vector: Flat 4d+8, SQ8 d+8, PQ M+8 (faiss stores an int64 id per vector).
    PQ takes the largest M of PQ_CANDIDATES that fits, with M ≤ d/2. OPQ ("auto") when each
    sub-quantizer covers ≥ 8 dimensions, where a learned rotation balances the variance across
    sub-spaces, and whenever M does not divide d (the rotation then also reduces to
    (d // M) × M dims, so e.g. PQ96 on 512-d is OPQ96_480, never dropping more than 1/16 of
    the dimensions); plain PQ for divisors with smaller
    sub-spaces, where the rotation costs a d×d training loop for little gain. opq="off" keeps
    to divisors of d; "on" rotates every PQ.
    """
    if n <= 0:
        raise IndexParamsError("no vectors to index (the filter kept no rows with embeddings)")
    reasons: list[str] = []
    nlist, why = nlist_for(n, max_nlist, max_train_vectors)
    reasons.append(why)
    spc = min(max(samples_per_cluster, 30), MAX_POINTS_PER_CENTROID)
    train_size = train_size_for(n, nlist, samples_per_cluster, max_train_vectors)
    reasons.append(
        f"train on a uniform random sample of {train_size:,} vectors "
        f"({spc} per cluster, faiss wants 30–256; at least 10,240 for the PQ codebooks; "
        f"at most index.max_train_vectors = {max_train_vectors:,})"
    )
    if index_key:
        m = re.search(r"IVF(\d+)", index_key)
        forced_nlist = int(m.group(1)) if m else 1
        code = _code_bytes_of(index_key, dim)
        est = n * (code + ID_BYTES) + _fixed_bytes(forced_nlist, dim)
        forced_train = train_size_for(n, forced_nlist, samples_per_cluster, max_train_vectors)
        reasons = [f"index_key forced by config: {index_key}",
                   f"train on a uniform random sample of {forced_train:,} vectors ({spc} per "
                   f"cluster of its {forced_nlist:,} lists, at least 10,240, at most "
                   f"index.max_train_vectors = {max_train_vectors:,})"]
        return IndexParams(index_key, n, dim, budget_bytes, forced_nlist, code, "OPQ" in index_key,
                           forced_train, est, reasons=reasons)

    ivf = _ivf(nlist)
    candidates: list[tuple[str, int, bool, int]] = [
        (f"{ivf},Flat", 4 * dim, False, 0),
        (f"{ivf},SQ8", dim, False, 0),
    ]
    for m in PQ_CANDIDATES:
        if m > dim // 2:
            continue
        divides = dim % m == 0
        if not divides and (dim // m) * m < dim * (1 - MAX_OPQ_DIM_LOSS):
            continue  # e.g. PQ192 on 512-d would drop to 384 dims: a quarter of the signal
        # A non-divisor M needs the OPQ rotation to (d // M) × M dims (autofaiss's OPQ64_448 is
        # the same move); without it the budget would fall back to the next divisor unspent.
        use_opq = opq == "on" or (opq == "auto" and (dim // m >= OPQ_MIN_DIMS or not divides))
        if use_opq:
            opq_dim = (dim // m) * m
            key = f"OPQ{m}_{opq_dim},{ivf},PQ{m}"
        else:
            if not divides:
                continue
            opq_dim = 0
            key = f"{ivf},PQ{m}"
        candidates.append((key, m, use_opq, opq_dim))

    for key, code, use_opq, opq_dim in candidates:
        fixed = _fixed_bytes(nlist, dim, opq_dim, pq="PQ" in key)
        est = n * (code + ID_BYTES) + fixed
        if est <= budget_bytes:
            per_vec = code + ID_BYTES
            reasons.append(
                f"{key}: {per_vec} B/vector × {n:,} + {fixed:,} B "
                f"(centroids{', HNSW' if nlist >= HNSW_QUANTIZER_FROM else ''}"
                f"{', OPQ matrix' if opq_dim else ''}{', PQ codebooks' if 'PQ' in key else ''})"
                f" = {est:,} B ≤ budget {budget_bytes:,} B: "
                f"the most accurate code that fits"
            )
            if "PQ" in key:
                if not use_opq:
                    reasons.append("no OPQ: sub-quantizers of < 8 dims gain little from rotation")
                elif dim % code and opq == "auto":
                    reasons.append(f"OPQ rotation to {opq_dim} dims: PQ{code} needs a dimension "
                                   f"divisible by {code} ({dim} is not)")
                else:
                    reasons.append("OPQ rotation: each sub-quantizer covers ≥ 8 dims")
            reasons.append("inner-product metric on L2-normalised vectors (cosine similarity)")
            return IndexParams(key, n, dim, budget_bytes, nlist, code, use_opq, train_size, est,
                               reasons=reasons)
        reasons.append(f"{key}: {est:,} B > budget {budget_bytes:,} B")
    raise IndexParamsError(
        f"no index fits {budget_bytes:,} bytes for {n:,} × {dim}-d vectors "
        f"(the smallest, {candidates[-1][0]}, needs "
        f"{n * (candidates[-1][1] + ID_BYTES) + _fixed_bytes(nlist, dim, candidates[-1][3], True):,}"
        f"); "
        f"raise index.memory_budget_gb"
    )


def _code_bytes_of(index_key: str, dim: int) -> int:
    """Bytes per vector of a forced index_key (for the size estimate only)."""
    m = re.search(r"PQ(\d+)(?:x(\d+))?", index_key.split(",")[-1])
    if m:
        bits = int(m.group(2) or 8)
        return int(m.group(1)) * bits // 8
    if "SQ8" in index_key:
        return dim
    if "SQ4" in index_key:
        return dim // 2
    return 4 * dim
