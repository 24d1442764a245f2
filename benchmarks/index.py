"""Our index build against autofaiss on the same vectors, the same memory budget, one run.

    .venv/bin/python benchmarks/index.py --n 1000000 --dim 512 --bytes-per-vector 128

Writes random-but-clustered L2-normalised vectors as float16 .npy (LAION's format), builds
with autofaiss (PyPI, in its own venv .venv-peers-index, created here if missing, run as a
subprocess) and with our core (same process, no Spark), then measures both indices the same
way here (same faiss, same 1,000 held-out queries, exact ground truth): build time, index size,
recall@10 and single-query latency at each index's chosen search parameters. Prints ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from laion_spark.index import core  # noqa: E402
from laion_spark.index.params import choose_params  # noqa: E402
from laion_spark.index.synthetic import clustered_vectors  # noqa: E402

log = logging.getLogger("bench.index")
PEER_VENV = REPO / ".venv-peers-index"

AUTOFAISS_SCRIPT = r"""
import json, sys, time
from autofaiss import build_index
emb, out, infos, budget, cores = sys.argv[1:6]
t = time.time()
build_index(embeddings=emb, index_path=out, index_infos_path=infos,
            max_index_memory_usage=budget, current_memory_available="16G",
            metric_type="ip", max_index_query_time_ms=10, nb_cores=int(cores),
            should_be_memory_mappable=False, make_direct_map=False, verbose=30)
print(json.dumps({"build_s": time.time() - t}))
"""


def ensure_peer_venv() -> Path:
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "autofaiss==2.18.0",
                        "pyarrow<18", "faiss-cpu==1.9.0.post1"],
                       check=True)  # autofaiss: numpy<2 (pyarrow 18+ needs 2); faiss 1.15 broke OPQMatrix(M=)
    return py


def build_ours(x: np.ndarray, budget: int, latency_ms: float, n_parts: int, seed: int = 0):
    """Our core on numpy: budget-chosen params, uniform random training sample, add in parts,
    merge, nprobe for the latency target."""
    t0 = time.time()
    params = choose_params(len(x), x.shape[1], budget)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), params.train_size, replace=False))]
    trained = core.serialize(core.train_index(params, sample, seed=seed))
    t_train = time.time() - t0
    work = tempfile.mkdtemp(prefix="ours-")
    parts, rows = [], []
    for a, b in _ranges(len(x), n_parts):
        pb = core.PartBuilder({"image": trained}, x.shape[1], None)
        pb.add_arrays({"image": x[a:b]}, np.arange(a, b))
        pb.write(os.path.join(work, f"p{a}"))
        parts.append(os.path.join(work, f"p{a}", "image.index"))
        rows.append(b - a)
    out = os.path.join(work, "image.index")
    index = core.merge_parts(trained, parts, rows, out, on_disk=False)
    nprobe, _ = core.tune_nprobe(index, x[:200], latency_ms)
    build_s = time.time() - t0
    return index, out, {"build_s": build_s, "train_s": t_train, "index_key": params.index_key,
                        "nprobe": nprobe, "reasons": params.reasons}


def _ranges(n, k):
    b = np.linspace(0, n, k + 1).astype(int)
    return list(zip(b[:-1], b[1:]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--bytes-per-vector", type=int, default=128,
                    help="memory budget per vector (budget = n × this)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--latent-dim", type=int, default=32,
                    help="intrinsic dimension of the clusters (0: isotropic noise)")
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--work", default=str(REPO / "bench-out" / "index"))
    ap.add_argument("--skip-autofaiss", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    cores = os.cpu_count() or 1
    budget = args.n * args.bytes_per_vector
    work = Path(args.work) / f"n{args.n}-d{args.dim}"
    (work / "emb").mkdir(parents=True, exist_ok=True)

    # One draw: the last `queries` vectors are held out of the index (same cluster centres).
    both = clustered_vectors(args.n + args.queries, args.dim,
                             n_clusters=max(100, args.n // 1000), seed=0,
                             latent_dim=args.latent_dim)
    x, q = both[: args.n], np.ascontiguousarray(both[args.n:])
    del both
    np.save(work / "emb" / "emb_0.npy", x.astype(np.float16))
    x = np.load(work / "emb" / "emb_0.npy").astype(np.float32)  # both sides see float16 input
    faiss.normalize_L2(x)

    gt = core.ExactTopK(q, k=100)
    for a in range(0, len(x), 100_000):
        gt.add(x[a:a + 100_000], a)
    truth = gt.result()[1]
    none = [set() for _ in range(len(q))]
    results = {}

    index, path, info = build_ours(x, budget, args.latency_ms, n_parts=max(2, cores))
    info.update(core.measure_recall(index, q, truth, none))
    info["size_bytes"] = os.path.getsize(path)
    results["ours"] = info
    log.info("ours: %s", json.dumps({k: v for k, v in info.items() if k != "reasons"}))
    del index

    if not args.skip_autofaiss:
        py = ensure_peer_venv()
        af_index = work / "autofaiss.index"
        t0 = time.time()
        proc = subprocess.run([str(py), "-c", AUTOFAISS_SCRIPT, str(work / "emb"), str(af_index),
                               str(work / "autofaiss_infos.json"), f"{budget // 1024}K",
                               str(cores)], capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"autofaiss failed:\n{proc.stderr[-3000:]}")
        af_infos = json.loads((work / "autofaiss_infos.json").read_text())
        index = faiss.read_index(str(af_index))
        af = {"build_s": wall, "index_key": af_infos.get("index_key"),
              "search_params": af_infos.get("index_param")}
        if af["search_params"]:
            faiss.ParameterSpace().set_index_parameters(index, af["search_params"])
        af.update(core.measure_recall(index, q, truth, none))
        af["size_bytes"] = os.path.getsize(af_index)
        results["autofaiss"] = af
        log.info("autofaiss: %s", json.dumps(af))

    print(f"\nindex benchmark: {args.n:,} × {args.dim}-d clustered vectors (float16 .npy), "
          f"budget {budget / 2**20:.0f} MiB ({args.bytes_per_vector} B/vector), {cores} cores, "
          f"{args.queries} held-out queries")
    cols = ["index_key", "build_s", "size_bytes", "recall@1", "recall@10", "recall@100",
            "latency_p50_ms", "latency_p99_ms"]
    for name, r in results.items():
        print(f"  {name:<10} " + "  ".join(f"{c}={_fmt(r.get(c))}" for c in cols)
              + f"  search={r.get('nprobe', r.get('search_params'))}")
    if "autofaiss" in results:
        o, a = results["ours"], results["autofaiss"]
        print(f"  ratios ours/autofaiss: build time {o['build_s'] / a['build_s']:.2f}, "
              f"size {o['size_bytes'] / a['size_bytes']:.2f}, "
              f"recall@10 {o['recall@10'] / max(a['recall@10'], 1e-9):.2f}, "
              f"latency p50 {o['latency_p50_ms'] / a['latency_p50_ms']:.2f}")
        print(f"  vectors/s per core: ours {args.n / o['build_s'] / cores:,.0f}, "
              f"autofaiss {args.n / a['build_s'] / cores:,.0f}")
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 2**20:.1f}MiB"
    return str(v)


if __name__ == "__main__":
    main()
