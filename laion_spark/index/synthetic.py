"""Random-but-clustered normalised vectors and `pairs`-shaped tables, for tests and the benchmark.

Why clustered: uniform random vectors have no neighbourhood structure, so every ANN index scores
badly on them (autofaiss issue #142); CLIP embeddings are clustered by topic.
"""
from __future__ import annotations

import mmh3
import numpy as np
import pyarrow as pa

from laion_spark.index.core import encode_embeddings


def clustered_vectors(n: int, dim: int, n_clusters: int = 1000, spread: float = 0.6,
                      seed: int = 0, chunk: int = 200_000, latent_dim: int = 0,
                      out: np.ndarray | None = None) -> np.ndarray:
    """n L2-normalised float32 vectors around `n_clusters` random centres (Gaussian, with the
    noise norm ≈ `spread` × the centre norm), made in chunks to bound memory.

    latent_dim > 0 draws the within-cluster offset from a random `latent_dim`-d subspace (plus
    5 % isotropic noise), like real embeddings whose intrinsic dimension is far below d; with
    isotropic noise in 512-d every point of a cluster is nearly equidistant and any compressed
    index looks bad (autofaiss issue #142).

    `out` (any (n, dim) array, e.g. a float16 .npy memmap) receives the rows instead of a new
    float32 array, so a 10M × 512 benchmark input never sits in RAM as float32."""
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    for a, b, x in iter_clustered_vectors(n, dim, n_clusters, spread, seed, chunk, latent_dim):
        out[a:b] = x
    return out


def iter_clustered_vectors(n: int, dim: int, n_clusters: int = 1000, spread: float = 0.6,
                           seed: int = 0, chunk: int = 200_000, latent_dim: int = 0):
    """(start, end, float32 rows) chunks of `clustered_vectors` (same draw, same order)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = (rng.standard_normal((latent_dim, dim)).astype(np.float32) / np.sqrt(dim)
             if latent_dim else None)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        which = rng.integers(0, n_clusters, size=b - a)
        if basis is None:
            noise = rng.standard_normal((b - a, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        else:
            z = rng.standard_normal((b - a, latent_dim)).astype(np.float32)
            noise = (z @ basis) * (spread / np.sqrt(latent_dim))  # norm ≈ spread
            noise += rng.standard_normal((b - a, dim)).astype(np.float32) * (
                0.05 * spread / np.sqrt(dim))
        x = centres[which] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield a, b, x


def pair_vectors(image: np.ndarray, seed: int = 1, noise: float = 0.8) -> np.ndarray:
    """Text embeddings that sit near their image's (a CLIP-like pair), not on top of it."""
    rng = np.random.default_rng(seed)
    t = image + rng.standard_normal(image.shape).astype(np.float32) * (noise / np.sqrt(image.shape[1]))
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def synthetic_pairs(n: int, dim: int = 64, seed: int = 0, n_clusters: int = 50,
                    pass_rate: float = 0.7, start: int = 0) -> pa.Table:
    """A table with the `pairs` columns: uid from mmh3(url+text) as LAION's hash, clustered
    image embeddings, paired text embeddings, a similarity and `passes_filter` from it."""
    rng = np.random.default_rng(seed)
    image = clustered_vectors(n, dim, n_clusters, seed=seed)
    text = pair_vectors(image, seed=seed + 1)
    idx = np.arange(start, start + n)
    urls = [f"http://img.example/{seed}/{i}.jpg" for i in idx]
    texts = [f"caption {i} of set {seed}" for i in idx]
    uid = np.array([mmh3.hash64(u + t)[0] for u, t in zip(urls, texts)], dtype=np.int64)
    sim = (image * text).sum(axis=1) * 0.35
    passes = rng.random(n) < pass_rate
    width = rng.integers(64, 1024, size=n).astype(np.int32)
    height = rng.integers(64, 1024, size=n).astype(np.int32)
    f32 = lambda a: pa.array(a.astype(np.float32))  # noqa: E731
    return pa.table({
        "uid": pa.array(uid),
        "url": pa.array(urls),
        "text": pa.array(texts),
        "language": pa.array(["en"] * n),
        "language_group": pa.array(["en"] * n),
        "status": pa.array(["success"] * n),
        "width": pa.array(width),
        "height": pa.array(height),
        "original_width": pa.array(width * 2),
        "original_height": pa.array(height * 2),
        "image_embedding": encode_embeddings(image),
        "text_embedding": encode_embeddings(text),
        "similarity": f32(sim),
        "passes_filter": pa.array(passes),
        "punsafe": f32(rng.random(n)),
        "pwatermark": f32(rng.random(n)),
        "ptoxic": f32(rng.random(n)),
        "clip_model": pa.array(["synthetic"] * n),
        "text_model": pa.array(["synthetic"] * n),
        "shard": pa.array(np.full(n, seed, dtype=np.int64)),
    })


def pairs_from_ids(batches, dim: int = 32, n_clusters: int = 64):
    """mapInArrow body: `spark.range(n)` batches → pairs-shaped rows (uid = id, clustered image
    embeddings, nearby text ones), made inside the executors so a test's driver never holds the
    table (schema: PAIRS_FROM_IDS_SCHEMA)."""
    import pyarrow.compute as pc

    centres = np.random.default_rng(0).standard_normal((n_clusters, dim)).astype(np.float32)
    for b in batches:
        ids = b.column("id").to_numpy()
        if not len(ids):
            continue
        rng = np.random.default_rng(int(ids[0]))
        n = len(ids)
        img = centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.standard_normal(
            (n, dim)).astype(np.float32)
        txt = img + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
        yield pa.RecordBatch.from_pydict({
            "uid": pa.array(ids.astype(np.int64)),
            "url": pc.binary_join_element_wise("https://e.x/", pa.array(ids).cast(pa.string()), ""),
            "text": pa.array(["t"] * n),
            "similarity": pa.array(rng.random(n).astype(np.float32)),
            "passes_filter": pa.array(np.ones(n, dtype=bool)),
            "image_embedding": encode_embeddings(img),
            "text_embedding": encode_embeddings(txt),
        })


PAIRS_FROM_IDS_SCHEMA = ("uid BIGINT, url STRING, text STRING, similarity FLOAT, "
                         "passes_filter BOOLEAN, image_embedding BINARY, text_embedding BINARY")
