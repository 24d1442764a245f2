"""Our index build against autofaiss on the same vectors, the same memory budget, one run.

    .venv/bin/python benchmarks/index.py --n 1000000 --dim 512 --bytes-per-vector 128

Writes random-but-clustered L2-normalised vectors as float16 .npy (LAION's format), builds
with autofaiss (PyPI, in its own venv .venv-peers-index, created here if missing, run as a
subprocess) and with our core (a child process too, no Spark, the .npy memory-mapped, parts
written in the index layout and merged on disk by default), so each build's peak RSS is its
own (os.wait4), then measures both indices the same
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
from laion_spark.index.synthetic import iter_clustered_vectors  # noqa: E402

log = logging.getLogger("bench.index")
PEER_VENV = Path(os.environ.get("LAION_INDEX_PEER_VENV", REPO / ".venv-peers-index"))

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


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "autofaiss==2.18.0",
                        "pyarrow<18", "faiss-cpu==1.9.0.post1"],
                       check=True)  # autofaiss: numpy<2 (pyarrow 18+ needs 2); faiss 1.15 broke OPQMatrix(M=)
    return py


def build_ours(emb_path: str, out_dir: str, budget: int, latency_ms: float, n_parts: int,
               merge: str, seed: int = 0) -> dict:
    """Our core, as a driver with a small memory would run it: the float16 .npy memory-mapped,
    a uniform random training sample read from it, parts added chunk by chunk and written to
    the store layout, then merged (streamed on disk or in memory), nprobe for the latency
    target. Runs in a child process so its peak RSS is its own."""
    from laion_spark.index.store import Store

    t0 = time.time()
    x16 = np.load(emb_path, mmap_mode="r")
    n, d = x16.shape
    params = choose_params(n, d, budget)
    rng = np.random.default_rng(seed)
    sample = _f32(x16[np.sort(rng.choice(n, params.train_size, replace=False))])
    trained = core.serialize(core.train_index(params, sample, seed=seed))
    del sample
    t_train = time.time() - t0
    store = Store(out_dir)
    for stale in ("parts", "metadata", "image.index", "image.ivfdata"):
        store.rm(stale)
    pb = core.PartBuilder({"image": trained}, d, None)
    parts = []
    for a, b in _ranges(n, n_parts):
        pb.start(int(a))
        for c in range(a, b, 100_000):
            e = min(b, c + 100_000)
            pb.add_arrays({"image": _f32(x16[c:e])}, np.arange(c, e))
        parts.append(pb.write(store))
    del pb
    t_add = time.time() - t0 - t_train
    paths = [os.path.join(out_dir, "parts", p["name"], "image.index") for p in parts]
    out = os.path.join(out_dir, "image.index")
    if merge == "ondisk":
        sizes = sum(np.load(os.path.join(out_dir, "parts", p["name"], "image.sizes.npy"))
                    for p in parts)
        index = core.merge_on_disk(trained, paths, sizes, out)
    else:
        index = core.merge_in_memory(trained, paths)
        faiss.write_index(index, out)
    t_merge = time.time() - t0 - t_train - t_add
    nprobe, _ = core.tune_nprobe(index, _f32(x16[:200]), latency_ms)
    build_s = time.time() - t0
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in ("image.index", "image.ivfdata")
               if os.path.exists(os.path.join(out_dir, f)))
    return {"build_s": build_s, "train_s": t_train, "add_s": t_add, "merge_s": t_merge,
            "index_key": params.index_key, "nprobe": nprobe, "merge": merge,
            "size_bytes": size, "index_path": out, "train_size": params.train_size,
            "reasons": params.reasons}


def _f32(a: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(a, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


LAST_CHILD_CPU_S: list[float] = []  # the last child's user + system CPU seconds


def _run_child(cmd: list[str]) -> tuple[str, float, int]:
    """Run a build in a child process: (stdout, wall seconds, the child's own peak RSS bytes).
    Its CPU seconds (user + system, all threads) go to LAST_CHILD_CPU_S: on a shared box they
    move far less with other people's load than the wall time does."""
    import threading

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks: dict = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda f, k: chunks[k].extend(f), args=(proc.stdout, "out")),
               threading.Thread(target=lambda f, k: chunks[k].extend(f), args=(proc.stderr, "err"))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    wall = time.time() - t0
    LAST_CHILD_CPU_S[:] = [usage.ru_utime + usage.ru_stime]
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{''.join(chunks['err'])[-3000:]}")
    return "".join(chunks["out"]), wall, usage.ru_maxrss * 1024


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
    ap.add_argument("--skip-ours", action="store_true",
                    help="build only autofaiss (split a long run; results.json keeps both)")
    ap.add_argument("--peer-venv", default=str(PEER_VENV),
                    help="autofaiss's venv (created with pinned versions if missing)")
    ap.add_argument("--merge", default="ondisk", choices=["ondisk", "memory"])
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child-ours":
        emb, out, budget, lat, n_parts, merge = sys.argv[2:8]
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(build_ours(emb, out, int(budget), float(lat), int(n_parts), merge),
                         default=str))
        return {}
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    cores = os.cpu_count() or 1
    budget = args.n * args.bytes_per_vector
    work = Path(args.work) / f"n{args.n}-d{args.dim}"
    load_start = os.getloadavg()
    q, truth = prepare_input(work, args.n, args.dim, args.queries, args.latent_dim)
    none = [set() for _ in range(len(q))]
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}

    if not args.skip_ours:
        out, wall, rss = _run_child([sys.executable, __file__, "--child-ours",
                                     str(work / "emb" / "emb_0.npy"), str(work / "ours"),
                                     str(budget), str(args.latency_ms), str(max(2, cores)),
                                     args.merge])
        info = json.loads(out.strip().splitlines()[-1])
        info["driver_peak_rss_bytes"] = rss
        info["cpu_s"] = LAST_CHILD_CPU_S[0]
        index = (faiss.read_index(info["index_path"], faiss.IO_FLAG_ONDISK_SAME_DIR)
                 if info["merge"] == "ondisk" else faiss.read_index(info["index_path"]))
        core.set_nprobe(index, info["nprobe"])
        info.update(core.measure_recall(index, q, truth, none))
        info["load_before_after"] = [load_start, os.getloadavg()]
        results["ours"] = info
        log.info("ours: %s", json.dumps({k: v for k, v in info.items() if k != "reasons"}))
        del index
        res_path.write_text(json.dumps(results, indent=2, default=str))

    if not args.skip_autofaiss:
        py = ensure_peer_venv(Path(args.peer_venv))
        af_index = work / "autofaiss.index"
        load_af = os.getloadavg()
        _, wall, rss = _run_child([str(py), "-c", AUTOFAISS_SCRIPT, str(work / "emb"),
                                   str(af_index), str(work / "autofaiss_infos.json"),
                                   f"{budget // 1024}K", str(cores)])
        af_infos = json.loads((work / "autofaiss_infos.json").read_text())
        index = faiss.read_index(str(af_index))
        af = {"build_s": wall, "driver_peak_rss_bytes": rss, "cpu_s": LAST_CHILD_CPU_S[0],
              "index_key": af_infos.get("index_key"),
              "search_params": af_infos.get("index_param")}
        if af["search_params"]:
            faiss.ParameterSpace().set_index_parameters(index, af["search_params"])
        af.update(core.measure_recall(index, q, truth, none))
        af["size_bytes"] = os.path.getsize(af_index)
        af["load_before_after"] = [load_af, os.getloadavg()]
        results["autofaiss"] = af
        log.info("autofaiss: %s", json.dumps(af))
        del index
        res_path.write_text(json.dumps(results, indent=2, default=str))

    print(f"\nload (uptime) at the end: {os.getloadavg()}")
    print(f"\nindex benchmark: {args.n:,} × {args.dim}-d clustered vectors (float16 .npy), "
          f"budget {budget / 2**20:.0f} MiB ({args.bytes_per_vector} B/vector), {cores} cores, "
          f"{args.queries} held-out queries")
    cols = ["index_key", "build_s", "cpu_s", "size_bytes", "driver_peak_rss_bytes", "recall@1",
            "recall@10", "recall@100", "latency_p50_ms", "latency_p99_ms"]
    for name, r in results.items():
        print(f"  {name:<10} " + "  ".join(f"{c}={_fmt(r.get(c))}" for c in cols)
              + f"  search={r.get('nprobe', r.get('search_params'))}"
              + f"  load1/5/15 before/after={r.get('load_before_after')}")
    if "autofaiss" in results:
        o, a = results["ours"], results["autofaiss"]
        print(f"  ratios ours/autofaiss: build time {o['build_s'] / a['build_s']:.2f}, "
              f"size {o['size_bytes'] / a['size_bytes']:.2f}, "
              f"recall@10 {o['recall@10'] / max(a['recall@10'], 1e-9):.2f}, "
              f"latency p50 {o['latency_p50_ms'] / a['latency_p50_ms']:.2f}")
        print(f"  vectors/s per core: ours {args.n / o['build_s'] / cores:,.0f}, "
              f"autofaiss {args.n / a['build_s'] / cores:,.0f}")
    res_path.write_text(json.dumps(results, indent=2, default=str))
    return results


def prepare_input(work: Path, n: int, dim: int, n_queries: int,
                  latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The float16 .npy both builders read, the held-out queries and their exact top-100, made
    once per (n, dim) and reused by later (split) runs. One draw: the last `n_queries` rows are
    held out (same cluster centres). Streamed in chunks: RAM stays ~1 GB at 10M × 512."""
    emb = work / "emb" / "emb_0.npy"
    qf, tf = work / "queries.npy", work / "truth.npy"
    if emb.exists() and qf.exists() and tf.exists():
        log.info("reusing %s, queries and ground truth", emb)
        return np.load(qf), np.load(tf)
    emb.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    x16 = np.lib.format.open_memmap(str(emb) + ".tmp.npy", mode="w+", dtype=np.float16,
                                    shape=(n, dim))
    q = np.empty((n_queries, dim), dtype=np.float32)
    for a, b, x in iter_clustered_vectors(n + n_queries, dim, n_clusters=max(100, n // 1000),
                                          seed=0, latent_dim=latent_dim):
        if a < n:
            x16[a:min(b, n)] = x[: min(b, n) - a]
        if b > n:
            q[max(a, n) - n: b - n] = x[max(a, n) - a:]
    x16.flush()
    del x16
    x16 = np.load(str(emb) + ".tmp.npy", mmap_mode="r")
    gt = core.ExactTopK(q, k=100)
    for a in range(0, n, 100_000):
        gt.add(_f32(x16[a:a + 100_000]), a)  # both sides see the float16 input
    del x16
    truth = gt.result()[1]
    np.save(qf, q)
    np.save(tf, truth)
    os.replace(str(emb) + ".tmp.npy", emb)
    log.info("input %d × %d float16 + exact top-100 of %d queries made in %.0f s",
             n, dim, n_queries, time.time() - t0)
    return q, truth


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 2**20:.1f}MiB"
    return str(v)


if __name__ == "__main__":
    main()
