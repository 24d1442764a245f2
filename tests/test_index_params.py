"""Index parameter choice from N, d and the memory budget (pure Python, no faiss training)."""
import pytest

from laion_spark.index.params import IndexParamsError, choose_params, nlist_for

MB = 1024 ** 2


def test_nlist_follows_faiss_guidelines():
    assert nlist_for(100_000)[0] == 1280  # 4√N = 1265 → 1280 (≤ 16√N = 5060)
    assert nlist_for(1_000_000)[0] == 4032  # 4√N = 4000
    assert nlist_for(5_000_000)[0] == 65_536
    assert nlist_for(50_000_000)[0] == 131_072  # 262,144 by the guideline, capped at 2^17
    assert nlist_for(5_850_000_000)[0] == 131_072
    assert nlist_for(50_000_000, max_nlist=1 << 18, max_train_vectors=8_000_000)[0] == 262_144
    k, why = nlist_for(50_000_000, max_train_vectors=1_000_000)
    assert k == 32_768 and "max_train_vectors" in why  # ≥ 30 training points per centroid
    k, why = nlist_for(2_000)
    assert k == 2_000 // 39 and "capped" in why


def test_training_sample_is_capped_at_laion_scale():
    p = choose_params(5_850_000_000, 768, 200 * 1024 ** 3)
    assert p.nlist == 131_072 and "IVF131072_HNSW32" in p.index_key
    assert p.train_size == 4_000_000  # not 64 × nlist = 8.4M
    assert choose_params(5_850_000_000, 768, 200 * 1024 ** 3,
                         max_train_vectors=2_000_000).train_size == 2_000_000


def test_budget_decides_the_code():
    n, d = 100_000, 512
    flat = choose_params(n, d, 1024 * MB)
    assert flat.index_key == "IVF1280,Flat"
    sq8 = choose_params(n, d, 60 * MB)
    assert sq8.index_key == "IVF1280,SQ8"
    pq64 = choose_params(n, d, 11 * MB)
    # 100k × 72 B + 2.6 MB centroids + 1 MiB OPQ + 0.5 MiB codebooks = 11.4 MB ≤ 11 MiB
    assert pq64.index_key == "OPQ64_512,IVF1280,PQ64"
    pq = choose_params(n, d, 10 * MB)
    # PQ64 no longer fits 10 MiB; PQ48 (56 B/vector) does
    assert pq.index_key == "OPQ48_480,IVF1280,PQ48"
    assert pq.estimated_bytes <= 10 * MB
    assert any("budget" in r for r in pq.reasons)
    assert pq.train_size == min(100_000, 64 * 1280)


def test_budget_left_by_a_divisor_buys_a_reduced_opq_code():
    """1M × 512-d in 128 MB: PQ128 does not fit, PQ64 would leave 40 MB unspent; PQ96 fits once
    OPQ rotates to 480 dims. PQ192 (→ 384 dims) would drop a quarter of the signal: never."""
    n, d, budget = 1_000_000, 512, 128_000_000
    p = choose_params(n, d, budget)
    assert p.index_key == "OPQ96_480,IVF4032,PQ96"
    assert p.estimated_bytes <= budget
    assert any("divisible by 96" in r for r in p.reasons)
    assert not any(r.startswith("OPQ192") for r in p.reasons)
    assert choose_params(n, d, budget, opq="off").index_key == "IVF4032,PQ64"


def test_large_n_uses_hnsw_quantizer_and_opq_rule():
    p = choose_params(5_000_000, 768, 400 * 1024 * MB)
    assert p.index_key.startswith("OPQ") or "SQ8" in p.index_key or "Flat" in p.index_key
    assert "IVF65536_HNSW32" in p.index_key
    small = choose_params(5_000_000, 768, int(5_000_000 * 72 + 300 * MB))
    assert small.index_key == "OPQ64_768,IVF65536_HNSW32,PQ64"
    no_opq = choose_params(5_000_000, 768, int(5_000_000 * 72 + 300 * MB), opq="off")
    assert no_opq.index_key == "IVF65536_HNSW32,PQ64"


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(IndexParamsError, match="memory_budget_gb"):
        choose_params(10_000_000, 512, 10 * MB)
    with pytest.raises(IndexParamsError, match="no vectors"):
        choose_params(0, 512, 10 * MB)


def test_forced_key_is_kept_and_explained():
    p = choose_params(100_000, 64, 10 * MB, index_key="IVF256,PQ16x4fs")
    assert p.index_key == "IVF256,PQ16x4fs" and p.nlist == 256 and p.code_bytes == 8
    assert "forced" in p.reasons[0]
